/*
 * Where things are on each platform the test firmware runs on.
 *
 * vmapple: vmapple-machine.md section 2 (ROM at 0x10_0000, RAM at
 * 0x7000_0000). virt: QEMU's -M virt (flash at 0, RAM at 0x4000_0000),
 * used to check the firmware itself against a known-good emulator.
 */
#ifndef PLATFORM_H
#define PLATFORM_H

#if defined(PLATFORM_VMAPPLE)
#define ROM_BASE      0x00100000UL
#define RAM_BASE      0x70000000UL
#define UART_BASE     0x20010000UL
#define GICD_BASE     0x10000000UL
#define GICR_BASE     0x10010000UL
/* Device (MMIO) space, mapped nGnRnE by the MMU test. */
#define DEVICE_START  0x10000000UL
#define DEVICE_END    0x70000000UL
#elif defined(PLATFORM_VIRT)
#define ROM_BASE      0x00000000UL
#define RAM_BASE      0x40000000UL
#define UART_BASE     0x09000000UL
#define GICD_BASE     0x08000000UL
#define GICR_BASE     0x080a0000UL
#define DEVICE_START  0x08000000UL
#define DEVICE_END    0x40000000UL
#else
#error "define PLATFORM_VMAPPLE or PLATFORM_VIRT"
#endif

/* Redistributor frames: RD_base then SGI_base, 128 KiB per CPU. */
#define GICR_STRIDE   0x20000UL
#define GICR_SGI      0x10000UL

#endif
