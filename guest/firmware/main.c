/*
 * vmapple's test firmware: proves the CPU, GICv3, generic timer, PSCI,
 * PL011 and SMP behaviour a guest relies on. CPU 0 runs the checks and
 * drives CPU 1 through a small command protocol in shared memory. Each
 * check prints "PASS <name>" or "FAIL <name>: ..."; the run ends with
 * "ALL CHECKS PASSED" or "CHECKS FAILED: n", then PSCI SYSTEM_OFF.
 */
#include "lib.h"
#include "mmu.h"

#define TIMER_IRQ 27
#define SGI_PING 1
#define SGI_PONG 2
#define TIMER_TICKS 10
#define SGI_ROUNDS 20
#define COUNT_PER_CPU 100000ul
#define CODE_ROUNDS 50
#define TLB_ROUNDS 6
#define CPU1_CONTEXT 0xc0ffee00ul

void secondary_entry(void);
extern char __scratch[];

/* Commands CPU 0 gives CPU 1 (command = sequence << 8 | code). */
enum {
    CMD_GIC = 1,
    CMD_COUNT_EXCLUSIVE,
    CMD_COUNT_LSE,
    CMD_MMU,
    CMD_WRITE_CODE,
    CMD_WATCH_TLB,
    CMD_OFF,
};

static volatile u64 command, command_done, command_arg;
static volatile u64 cpu1_context, cpu1_mpidr, cpu1_alive;
static volatile u64 shared_count;
static volatile u64 pings, pongs;
static volatile u64 ticks, ticks_with_istatus, tick_last, tick_min_gap, tick_interval;
static volatile u64 tlb_round, tlb_seen;
static u64 frequency, timeout;

/* --- interrupts ------------------------------------------------------- */

static void timer_tick(void)
{
    u64 now = counter();
    if (SYSREG_READ(CNTV_CTL_EL0) & 4)
        ticks_with_istatus++;
    if (ticks > 0 && now - tick_last < tick_min_gap)
        tick_min_gap = now - tick_last;
    tick_last = now;
    if (++ticks < TIMER_TICKS)
        SYSREG_WRITE(CNTV_CVAL_EL0, now + tick_interval);
    else
        SYSREG_WRITE(CNTV_CTL_EL0, 0);
}

void exception_handler(u64 kind, struct frame *frame)
{
    if (kind == EXC_IRQ_SPX) {
        u32 intid = SYSREG_READ(ICC_IAR1_EL1) & 0xffffff;
        if (intid == 1023)
            return;
        if (intid == TIMER_IRQ)
            timer_tick();
        else if (intid == SGI_PING) {
            pings++;
            gic_send_sgi(SGI_PONG, 0);
        } else if (intid == SGI_PONG)
            pongs++;
        SYSREG_WRITE(ICC_EOIR1_EL1, intid);
        return;
    }
    puts("unexpected exception: kind ");
    put_dec(kind);
    puts(" esr ");
    put_hex(SYSREG_READ("esr_el1"));
    puts(" elr ");
    put_hex(frame->elr);
    puts(" far ");
    put_hex(SYSREG_READ("far_el1"));
    puts("\nCHECKS FAILED: exception\n");
    system_off();
}

/* --- atomics ---------------------------------------------------------- */

static void add_exclusive(volatile u64 *p, u64 n)
{
    for (u64 i = 0; i < n; i++) {
        u64 value;
        u32 failed;
        __asm__ volatile("1: ldxr %0, [%2]\n"
                         "   add %0, %0, #1\n"
                         "   stxr %w1, %0, [%2]\n"
                         "   cbnz %w1, 1b"
                         : "=&r"(value), "=&r"(failed)
                         : "r"(p)
                         : "memory");
    }
}

static void add_lse(volatile u64 *p, u64 n)
{
    for (u64 i = 0; i < n; i++) {
        u64 old;
        __asm__ volatile("ldadd %1, %0, [%2]" : "=r"(old) : "r"(1ul), "r"(p) : "memory");
    }
}

/* --- CPU 1 -------------------------------------------------------------- */

static u32 *code_buffer(void) { return (u32 *)(__scratch + 0x10000); }

static void write_code(u64 k)
{
    u32 *code = code_buffer();
    code[0] = 0x52800000u | (u32)(k << 5); /* movz w0, #k */
    code[1] = 0xd65f03c0u;                 /* ret */
    /* Arm ARM B2.4.4: make the new instructions visible to all CPUs. */
    __asm__ volatile("dc cvau, %0\n dsb ish\n ic ivau, %0\n dsb ish" ::"r"(code) : "memory");
}

static void watch_tlb(void)
{
    volatile u64 *va = (volatile u64 *)TEST_VA;
    u64 round = 0;
    while (round < TLB_ROUNDS) {
        (void)*va; /* keep the translation warm */
        if (tlb_round != round) {
            round = tlb_round;
            dsb_ish();
            isb();
            tlb_seen = *va;
            dsb_ish();
            command_done = command;
        }
    }
}

void secondary_main(u64 context)
{
    u64 done = 0;
    cpu1_context = context;
    cpu1_mpidr = SYSREG_READ(MPIDR_EL1);
    cpu1_alive = 1;
    for (;;) {
        u64 cmd = command;
        if (cmd == done) {
            cpu_relax();
            continue;
        }
        switch (cmd & 0xff) {
        case CMD_GIC:
            gic_init_cpu(1);
            gic_enable_private(1, SGI_PING, 0x80);
            irq_enable();
            break;
        case CMD_COUNT_EXCLUSIVE:
            add_exclusive(&shared_count, COUNT_PER_CPU);
            break;
        case CMD_COUNT_LSE:
            add_lse(&shared_count, COUNT_PER_CPU);
            break;
        case CMD_MMU:
            mmu_enable();
            break;
        case CMD_WRITE_CODE:
            write_code(command_arg);
            break;
        case CMD_WATCH_TLB:
            command_done = cmd;
            watch_tlb();
            /* watch_tlb acknowledged every later command itself. */
            cmd = command;
            break;
        case CMD_OFF:
            command_done = cmd;
            dsb_ish();
            hvc(PSCI_CPU_OFF, 0, 0, 0);
            puts("FAIL cpu-off: CPU_OFF returned\n");
            for (;;)
                ;
        }
        done = cmd;
        dsb_ish();
        command_done = cmd;
    }
}

/* Gives CPU 1 a command; with wait, returns whether it completed. */
static u64 sequence;
static void give(u64 code, u64 arg)
{
    command_arg = arg;
    dsb_ish();
    command = (++sequence << 8) | code;
}

static int completed(void)
{
    return wait_for(&command_done, command, timeout);
}

/* --- checks ------------------------------------------------------------- */

static void check_timer(void)
{
    tick_interval = frequency / 1000; /* 1 ms */
    tick_min_gap = ~0ul;
    gic_enable_private(0, TIMER_IRQ, 0x80);
    SYSREG_WRITE(CNTV_CVAL_EL0, counter() + tick_interval);
    SYSREG_WRITE(CNTV_CTL_EL0, 1);
    irq_enable();
    u64 deadline = counter() + timeout;
    while (ticks < TIMER_TICKS && counter() < deadline)
        __asm__ volatile("wfi");
    check("timer-10", ticks == TIMER_TICKS, "ticks", ticks);
    check("timer-interval", tick_min_gap >= tick_interval, "shortest gap in ticks", tick_min_gap);
    check("timer-istatus", ticks_with_istatus == TIMER_TICKS, "ticks with ISTATUS set", ticks_with_istatus);
}

static void check_cpu_on(void)
{
    check("affinity-off", hvc(PSCI_AFFINITY, 1, 0, 0) == 1, "AFFINITY_INFO(cpu1)", hvc(PSCI_AFFINITY, 1, 0, 0));
    u64 rc = hvc(PSCI_CPU_ON, 1, (u64)secondary_entry, CPU1_CONTEXT);
    int up = rc == 0 && wait_for(&cpu1_alive, 1, timeout);
    check("cpu-on", up, "CPU_ON returned", rc);
    check("cpu-on-context", cpu1_context == CPU1_CONTEXT, "x0 at entry", cpu1_context);
    check("cpu-on-mpidr", (cpu1_mpidr & 0xff00fffffful) == 1, "MPIDR", cpu1_mpidr);
    check("affinity-on", hvc(PSCI_AFFINITY, 1, 0, 0) == 0, "AFFINITY_INFO(cpu1)", hvc(PSCI_AFFINITY, 1, 0, 0));
}

static void check_sgi(void)
{
    give(CMD_GIC, 0);
    int ok = completed();
    gic_enable_private(0, SGI_PONG, 0x80);
    for (u64 round = 1; ok && round <= SGI_ROUNDS; round++) {
        gic_send_sgi(SGI_PING, 1);
        ok = wait_for(&pongs, round, timeout);
    }
    check("sgi", ok && pings == SGI_ROUNDS && pongs == SGI_ROUNDS, "pongs", pongs);
}

static void check_counting(const char *name, u64 code, void (*add)(volatile u64 *, u64))
{
    shared_count = 0;
    dsb_ish();
    give(code, 0);
    add(&shared_count, COUNT_PER_CPU);
    int ok = completed();
    check(name, ok && shared_count == 2 * COUNT_PER_CPU, "total", shared_count);
}

static void check_mmu(void)
{
    mmu_build();
    mmu_enable();
    give(CMD_MMU, 0);
    int ok = completed();
    u64 sctlr = SYSREG_READ("sctlr_el1");
    check("mmu", ok && (sctlr & 1), "SCTLR_EL1", sctlr);
    check_counting("mmu-atomics", CMD_COUNT_LSE, add_lse);
}

static void check_code(void)
{
    int ok = 1;
    u64 got = 0, k = 0;
    for (k = 1; ok && k <= CODE_ROUNDS; k++) {
        give(CMD_WRITE_CODE, k * 7);
        ok = completed();
        isb();
        got = ((u64(*)(void))code_buffer())();
        ok = ok && got == k * 7;
    }
    check("smp-code", ok, "returned", got);
}

static void check_tlb(void)
{
    volatile u64 *va = (volatile u64 *)TEST_VA;
    int ok = va[0] == TEST_MARKER(0);
    give(CMD_WATCH_TLB, 0);
    ok = ok && completed();
    for (u64 round = 1; ok && round <= TLB_ROUNDS; round++) {
        int which = round & 1;
        mmu_map_test_page(which);
        __asm__ volatile("dsb ishst\n tlbi vae1is, %0\n dsb ish\n isb" ::"r"(TEST_VA >> 12) : "memory");
        give(CMD_WATCH_TLB, 0);
        dsb_ish();
        tlb_round = round;
        ok = completed() && tlb_seen == TEST_MARKER(which) && va[0] == TEST_MARKER(which);
    }
    check("smp-tlb", ok, "CPU 1 saw", tlb_seen);
}

static void check_cpu_off(void)
{
    give(CMD_OFF, 0);
    int ok = completed();
    u64 deadline = counter() + timeout;
    while (hvc(PSCI_AFFINITY, 1, 0, 0) != 1 && counter() < deadline)
        cpu_relax();
    check("cpu-off", ok && hvc(PSCI_AFFINITY, 1, 0, 0) == 1, "AFFINITY_INFO(cpu1)", hvc(PSCI_AFFINITY, 1, 0, 0));
}

void main(void)
{
    puts("vmapple test firmware\n");
    check("uart", 1, "", 0);
    frequency = SYSREG_READ(CNTFRQ_EL0);
    timeout = frequency * 10;

    u64 version = hvc(PSCI_VERSION, 0, 0, 0);
    check("psci-version", (version >> 16) >= 1, "PSCI_VERSION", version);

    gic_init_distributor();
    gic_init_cpu(0);
    check("gic-init", SYSREG_READ(ICC_SRE_EL1) & 1, "ICC_SRE_EL1", SYSREG_READ(ICC_SRE_EL1));

    check_timer();
    check_cpu_on();
    check_sgi();
    check_counting("atomics-exclusive", CMD_COUNT_EXCLUSIVE, add_exclusive);
    check_counting("atomics-lse", CMD_COUNT_LSE, add_lse);
    check_mmu();
    check_code();
    check_tlb();
    check_cpu_off();

    if (failures() == 0) {
        puts("ALL CHECKS PASSED\n");
    } else {
        puts("CHECKS FAILED: ");
        put_dec(failures());
        puts("\n");
    }
    system_off();
}
