#include "lib.h"

#define UARTDR 0x000
#define UARTFR 0x018
#define UARTFR_TXFF (1u << 5)

void putc(char c)
{
    while (mmio_read32(UART_BASE + UARTFR) & UARTFR_TXFF)
        ;
    mmio_write32(UART_BASE + UARTDR, (u8)c);
}

void puts(const char *s)
{
    while (*s) {
        if (*s == '\n')
            putc('\r');
        putc(*s++);
    }
}

void put_hex(u64 v)
{
    puts("0x");
    for (int shift = 60; shift >= 0; shift -= 4)
        putc("0123456789abcdef"[(v >> shift) & 0xf]);
}

void put_dec(u64 v)
{
    char buf[21];
    int i = 20;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    puts(&buf[i]);
}

u64 hvc(u64 fn, u64 a1, u64 a2, u64 a3)
{
    register u64 x0 __asm__("x0") = fn;
    register u64 x1 __asm__("x1") = a1;
    register u64 x2 __asm__("x2") = a2;
    register u64 x3 __asm__("x3") = a3;
    __asm__ volatile("hvc #0" : "+r"(x0), "+r"(x1), "+r"(x2), "+r"(x3) : : "memory");
    return x0;
}

void system_off(void)
{
    hvc(PSCI_SYSTEM_OFF, 0, 0, 0);
    puts("SYSTEM_OFF returned\n");
    for (;;)
        __asm__ volatile("wfi");
}

/* Distributor (IHI 0069 12.9) and redistributor (12.10/12.11) offsets. */
#define GICD_CTLR       0x0000
#define GICD_CTLR_EN_G1 (1u << 1)
#define GICD_CTLR_ARE   (1u << 4)
#define GICR_WAKER      0x0014
#define GICR_WAKER_PS   (1u << 1)
#define GICR_WAKER_CA   (1u << 2)
#define GICR_IGROUPR0   0x0080
#define GICR_ISENABLER0 0x0100
#define GICR_IPRIORITYR 0x0400

void gic_init_distributor(void)
{
    mmio_write32(GICD_BASE + GICD_CTLR, GICD_CTLR_ARE | GICD_CTLR_EN_G1);
}

void gic_init_cpu(u32 cpu)
{
    u64 rd = GICR_BASE + cpu * GICR_STRIDE;
    mmio_write32(rd + GICR_WAKER, mmio_read32(rd + GICR_WAKER) & ~GICR_WAKER_PS);
    while (mmio_read32(rd + GICR_WAKER) & GICR_WAKER_CA)
        ;
    /* Every SGI and PPI in group 1 (IRQ). */
    mmio_write32(rd + GICR_SGI + GICR_IGROUPR0, 0xffffffffu);
    SYSREG_WRITE(ICC_SRE_EL1, SYSREG_READ(ICC_SRE_EL1) | 1);
    isb();
    SYSREG_WRITE(ICC_PMR_EL1, 0xff);
    SYSREG_WRITE(ICC_BPR1_EL1, 0);
    SYSREG_WRITE(ICC_IGRPEN1_EL1, 1);
    isb();
}

void gic_enable_private(u32 cpu, u32 intid, u8 priority)
{
    u64 sgi = GICR_BASE + cpu * GICR_STRIDE + GICR_SGI;
    *(volatile u8 *)(sgi + GICR_IPRIORITYR + intid) = priority;
    mmio_write32(sgi + GICR_ISENABLER0, 1u << intid);
}

void gic_send_sgi(u32 sgi, u32 target_cpu)
{
    /* ICC_SGI1R_EL1: Aff1 from the target's cluster, TargetList bit Aff0. */
    u64 aff1 = target_cpu / 16, aff0 = target_cpu % 16;
    dsb_ish();
    SYSREG_WRITE(ICC_SGI1R_EL1, ((u64)sgi << 24) | (aff1 << 16) | (1ul << aff0));
    isb();
}

static u32 failed;

void check(const char *name, int ok, const char *detail, u64 value)
{
    if (ok) {
        puts("PASS ");
        puts(name);
        puts("\n");
        return;
    }
    failed++;
    puts("FAIL ");
    puts(name);
    puts(": ");
    puts(detail);
    puts(" ");
    put_hex(value);
    puts("\n");
}

u32 failures(void)
{
    return failed;
}

int wait_for(volatile u64 *flag, u64 want, u64 ticks)
{
    u64 deadline = counter() + ticks;
    while (*flag != want) {
        if (counter() > deadline)
            return 0;
        cpu_relax();
    }
    return 1;
}
