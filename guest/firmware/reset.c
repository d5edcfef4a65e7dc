/*
 * Reset behaviour (vmapple-machine.md 6.2, 6.7, 20.1 vector 3). RAM keeps
 * its contents across a reset, so a boot counter there tells the boots
 * apart:
 *   boot 1 overwrites a byte of its own ROM image and resets;
 *   boot 2 checks the byte is back, reports, and resets again;
 *   every later boot resets at once, which a VMM should recognise as a
 *   guest stuck in a reset loop.
 */
#include "lib.h"

#define PSCI_SYSTEM_RESET 0x84000009UL
/* Beyond the firmware's own RAM use (bss, stacks, scratch). */
#define BOOT_COUNT ((volatile u64 *)(RAM_BASE + 0x2000000))

/* A byte of the ROM image, always accessed through a volatile pointer. */
static const u8 rom_byte = 0x5a;
#define ROM_BYTE (*(volatile u8 *)&rom_byte)

void exception_handler(u64 kind, struct frame *frame)
{
    (void)kind;
    (void)frame;
    puts("unexpected exception\n");
    system_off();
}

void main(void)
{
    u64 boot = ++*BOOT_COUNT;
    dsb_ish();
    if (boot == 1) {
        puts("boot 1: overwriting the ROM image and resetting\n");
        ROM_BYTE = 0xa5;
    } else if (boot == 2) {
        check("rom-restored", ROM_BYTE == 0x5a, "ROM byte after reset", ROM_BYTE);
        puts("boot 2: resetting for ever\n");
    }
    hvc(PSCI_SYSTEM_RESET, 0, 0, 0);
    puts("SYSTEM_RESET returned\n");
    system_off();
}

void secondary_main(u64 context)
{
    (void)context;
}
