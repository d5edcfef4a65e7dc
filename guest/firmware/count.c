/*
 * Snapshot test program: both CPUs add to one shared counter with
 * exclusive-monitor atomics, long enough for the host to save the VM in
 * the middle. CPU 0 prints "COUNT progress n" as it goes and, once both
 * are done, "COUNT TOTAL <sum>": exactly 2 * PER_CPU if no increment was
 * lost or doubled across a save and restore.
 */
#include "lib.h"

#define PER_CPU 20000000ul
#define PROGRESS_EVERY 2000000ul

void secondary_entry(void);

static volatile u64 shared_count, cpu1_done;

void exception_handler(u64 kind, struct frame *frame)
{
    (void)kind;
    (void)frame;
    puts("COUNT unexpected exception\n");
    system_off();
}

static void add_exclusive(volatile u64 *p, u64 n, int report)
{
    for (u64 i = 1; i <= n; i++) {
        u64 value;
        u32 failed;
        __asm__ volatile("1: ldxr %0, [%2]\n"
                         "   add %0, %0, #1\n"
                         "   stxr %w1, %0, [%2]\n"
                         "   cbnz %w1, 1b"
                         : "=&r"(value), "=&r"(failed)
                         : "r"(p)
                         : "memory");
        if (report && i % PROGRESS_EVERY == 0) {
            puts("COUNT progress ");
            put_dec(i / PROGRESS_EVERY);
            puts("\n");
        }
    }
}

void secondary_main(u64 context)
{
    (void)context;
    add_exclusive(&shared_count, PER_CPU, 0);
    dsb_ish();
    cpu1_done = 1;
    for (;;)
        cpu_relax();
}

void main(void)
{
    puts("COUNT start\n");
    if (hvc(PSCI_CPU_ON, 1, (u64)secondary_entry, 0) != 0) {
        puts("COUNT cpu-on failed\n");
        system_off();
    }
    add_exclusive(&shared_count, PER_CPU, 1);
    while (!cpu1_done)
        cpu_relax();
    dsb_ish();
    puts("COUNT TOTAL ");
    put_dec(shared_count);
    puts("\n");
    system_off();
}
