/*
 * Micro-benchmarks of an accelerator, identical on vmapple and QEMU virt:
 * ALU throughput, MMIO round trips, and virtual-timer interrupt latency,
 * all timed with the guest's own counter. Prints "BENCH <name> <value>"
 * lines for scripts/bench.sh and powers off.
 */
#include "lib.h"

#define ALU_ITERATIONS 20000000ul
#define ALU_INSNS_PER_ITERATION 10ul
#define MMIO_READS 1000000ul
#define IRQ_SAMPLES 2000ul
#define TIMER_IRQ 27

static u64 frequency;
static volatile u64 irq_taken, irq_latency_sum, irq_latency_max, irq_cval;

void exception_handler(u64 kind, struct frame *frame)
{
    (void)frame;
    if (kind != EXC_IRQ_SPX) {
        puts("BENCH unexpected-exception\n");
        system_off();
    }
    u64 now = counter();
    u32 intid = SYSREG_READ(ICC_IAR1_EL1) & 0xffffff;
    if (intid == TIMER_IRQ) {
        u64 late = now - irq_cval;
        irq_latency_sum += late;
        if (late > irq_latency_max)
            irq_latency_max = late;
        irq_taken++;
        SYSREG_WRITE(CNTV_CTL_EL0, 0);
    }
    if (intid != 1023)
        SYSREG_WRITE(ICC_EOIR1_EL1, intid);
}

static void report(const char *name, u64 value)
{
    puts("BENCH ");
    puts(name);
    puts(" ");
    put_dec(value);
    puts("\n");
}

static u64 ticks_to_ns(u64 ticks) { return ticks * 1000000000ul / frequency; }

/* Ten data-dependent ALU instructions per iteration, counted exactly:
 * 8 arithmetic + subs + b.ne. */
static void bench_alu(void)
{
    u64 a = 1, b = 3, n = ALU_ITERATIONS;
    u64 start = counter();
    __asm__ volatile("1: add %0, %0, %1\n"
                     "   eor %1, %1, %0\n"
                     "   ror %0, %0, #3\n"
                     "   add %1, %1, #7\n"
                     "   orr %0, %0, %1\n"
                     "   lsl %1, %1, #1\n"
                     "   sub %0, %0, %1\n"
                     "   mul %1, %1, %0\n"
                     "   subs %2, %2, #1\n"
                     "   b.ne 1b"
                     : "+r"(a), "+r"(b), "+r"(n));
    u64 ticks = counter() - start;
    report("alu-minsns-per-s", ALU_ITERATIONS * ALU_INSNS_PER_ITERATION * frequency / ticks / 1000000ul);
}

/* Reads of the UART's flag register: each one leaves the guest. */
static void bench_mmio(void)
{
    u64 start = counter();
    for (u64 i = 0; i < MMIO_READS; i++)
        (void)mmio_read32(UART_BASE + 0x018);
    u64 ticks = counter() - start;
    report("mmio-kreads-per-s", MMIO_READS * frequency / ticks / 1000ul);
}

/* Timer interrupts 100 us ahead, waited for in WFI: how late after CVAL
 * the handler runs. */
static void bench_irq(void)
{
    gic_init_distributor();
    gic_init_cpu(0);
    gic_enable_private(0, TIMER_IRQ, 0x80);
    irq_enable();
    u64 ahead = frequency / 10000;
    for (u64 i = 0; i < IRQ_SAMPLES; i++) {
        irq_cval = counter() + ahead;
        SYSREG_WRITE(CNTV_CVAL_EL0, irq_cval);
        SYSREG_WRITE(CNTV_CTL_EL0, 1);
        while (irq_taken == i)
            __asm__ volatile("wfi");
    }
    report("irq-latency-avg-ns", ticks_to_ns(irq_latency_sum / IRQ_SAMPLES));
    report("irq-latency-max-ns", ticks_to_ns(irq_latency_max));
}

void main(void)
{
    frequency = SYSREG_READ(CNTFRQ_EL0);
    puts("vmapple benchmarks\n");
    bench_alu();
    bench_mmio();
    bench_irq();
    puts("BENCH done\n");
    system_off();
}

void secondary_main(u64 context)
{
    (void)context;
}
