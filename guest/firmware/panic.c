/*
 * A guest that reports a kernel panic through pvpanic (vmapple-machine.md
 * section 12) and, if the VMM lets it run on, says so and powers off. The
 * test checks what each --on-panic policy makes of it.
 */
#include "lib.h"

#define PVPANIC_BASE 0x20070000UL
#define PVPANIC_PANICKED 0x01

void exception_handler(u64 kind, struct frame *frame)
{
    (void)kind;
    (void)frame;
    puts("unexpected exception\n");
    system_off();
}

void main(void)
{
    puts("reporting a panic\n");
    *(volatile u8 *)PVPANIC_BASE = PVPANIC_PANICKED;
    puts("still running after the panic report\n");
    system_off();
}

void secondary_main(u64 context)
{
    (void)context;
}
