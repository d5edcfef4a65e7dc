/*
 * Message-based SPIs on vmapple with --msi on: the GICv2m frame at
 * 0x1FFF_0000 and the distributor's GICD_SETSPI_NSR/CLRSPI_NSR. Reads the
 * frame's registers, rings every doorbell for every SPI of the block and
 * takes each as an IRQ, then writes hostile values and checks that nothing
 * became pending. The last check reads MSI_TYPER with LDP (no syndrome on
 * a real stage-2 fault): on an accelerator that cannot emulate that, the
 * run stops there, after every other check has printed.
 */
#include "lib.h"

#define V2M_BASE          0x1fff0000UL
#define V2M_MSI_TYPER     0x008
#define V2M_MSI_SETSPI_NS 0x040
#define V2M_MSI_IIDR      0xfcc
#define V2M_CIDR0         0xff0
#define GICD_TYPER        0x0004
#define GICD_TYPER_MBIS   (1u << 16)
#define GICD_SETSPI_NSR   0x0040
#define GICD_CLRSPI_NSR   0x0048
#define GICD_IGROUPR      0x0080
#define GICD_ISENABLER    0x0100
#define GICD_ISPENDR      0x0200
#define GICD_ICPENDR      0x0280
#define GICD_IPRIORITYR   0x0400
#define GICD_ICFGR        0x0c00
#define GICD_IROUTER      0x6000

#define FIRST_INTID 0xa0
#define NUM_SPIS    128

static volatile u64 last_intid, taken;

/* Plain single-register accesses: the compiler would otherwise pick
 * writeback forms inside loops, which a stage-2 fault reports without a
 * syndrome; this program tests the frame, not that emulation. */
static inline u32 r32(u64 a)
{
    u32 v;
    __asm__ volatile("ldr %w0, [%1]" : "=r"(v) : "r"(a) : "memory");
    return v;
}
static inline void w32(u64 a, u32 v) { __asm__ volatile("str %w1, [%0]" ::"r"(a), "r"(v) : "memory"); }
static inline void w8(u64 a, u8 v) { __asm__ volatile("strb %w1, [%0]" ::"r"(a), "r"(v) : "memory"); }
static inline void w64(u64 a, u64 v) { __asm__ volatile("str %1, [%0]" ::"r"(a), "r"(v) : "memory"); }
static u64 timeout;

void exception_handler(u64 kind, struct frame *frame)
{
    (void)frame;
    if (kind != EXC_IRQ_SPX) {
        puts("unexpected exception\n");
        system_off();
    }
    u64 intid = SYSREG_READ(ICC_IAR1_EL1) & 0xffffff;
    if (intid >= 1020)
        return;
    last_intid = intid;
    taken++;
    SYSREG_WRITE(ICC_EOIR1_EL1, intid);
}

static int pending(u32 intid)
{
    return (r32(GICD_BASE + GICD_ISPENDR + intid / 32 * 4) >> (intid % 32)) & 1;
}

static void setup_spis(void)
{
    for (u32 intid = FIRST_INTID; intid < FIRST_INTID + NUM_SPIS; intid++) {
        u64 cfg = GICD_BASE + GICD_ICFGR + intid / 16 * 4;
        w32(cfg, r32(cfg) | 2u << (intid % 16 * 2));
        w8(GICD_BASE + GICD_IPRIORITYR + intid, 0x80);
        w64(GICD_BASE + GICD_IROUTER + intid * 8, 0); /* CPU 0 */
        u64 group = GICD_BASE + GICD_IGROUPR + intid / 32 * 4;
        w32(group, r32(group) | 1u << (intid % 32));
        w32(GICD_BASE + GICD_ISENABLER + intid / 32 * 4, 1u << (intid % 32));
    }
}

/* Rings `doorbell` with every INTID of the block; how many were taken. */
static u64 ring_all(u64 doorbell)
{
    u64 ok = 0;
    for (u32 intid = FIRST_INTID; intid < FIRST_INTID + NUM_SPIS; intid++) {
        u64 before = taken;
        dsb_ish();
        w32(doorbell, intid);
        if (wait_for(&taken, before + 1, timeout) && last_intid == intid)
            ok++;
    }
    return ok;
}

void main(void)
{
    puts("vmapple MSI firmware\n");
    timeout = SYSREG_READ(CNTFRQ_EL0) * 10;
    gic_init_distributor();
    gic_init_cpu(0);

    u32 typer = r32(V2M_BASE + V2M_MSI_TYPER);
    check("v2m-typer", typer == ((FIRST_INTID << 16) | NUM_SPIS), "MSI_TYPER", typer);
    u32 iidr = r32(V2M_BASE + V2M_MSI_IIDR);
    check("v2m-iidr", (iidr & 0xfff) == 0x43b, "MSI_IIDR", iidr);
    u32 cidr0 = r32(V2M_BASE + V2M_CIDR0);
    check("v2m-cidr", cidr0 == 0x0d, "CIDR0", cidr0);
    u32 gicd_typer = r32(GICD_BASE + GICD_TYPER);
    check("gicd-mbis", gicd_typer & GICD_TYPER_MBIS, "GICD_TYPER", gicd_typer);

    setup_spis();
    irq_enable();
    u64 n = ring_all(V2M_BASE + V2M_MSI_SETSPI_NS);
    check("v2m-every-spi", n == NUM_SPIS, "taken", n);
    n = ring_all(GICD_BASE + GICD_SETSPI_NSR);
    check("gicd-every-spi", n == NUM_SPIS, "taken", n);

    /* With IRQs masked the state stays visible in the pending bits. */
    irq_disable();
    w32(GICD_BASE + GICD_SETSPI_NSR, FIRST_INTID + 7);
    dsb_ish();
    int set = pending(FIRST_INTID + 7);
    w32(GICD_BASE + GICD_CLRSPI_NSR, FIRST_INTID + 7);
    dsb_ish();
    check("gicd-clrspi", set && !pending(FIRST_INTID + 7), "pending after set", set);

    /* Values outside the block: the UART's SPI, a PCI INTx line, the SPI
     * just below the block, past the end, garbage. Nothing may pend. */
    static const u32 hostile[] = {33, 64, FIRST_INTID - 1, FIRST_INTID + NUM_SPIS, 1023, 0xffffffffu};
    u64 before = taken;
    for (u32 i = 0; i < sizeof hostile / sizeof hostile[0]; i++) {
        w32(V2M_BASE + V2M_MSI_SETSPI_NS, hostile[i]);
        w32(GICD_BASE + GICD_SETSPI_NSR, hostile[i]);
    }
    /* Stores to read-only registers of the frame. */
    w32(V2M_BASE + V2M_MSI_TYPER, 0);
    w8(V2M_BASE + V2M_MSI_SETSPI_NS, FIRST_INTID);
    dsb_ish();
    int quiet = !pending(33) && !pending(64) && !pending(FIRST_INTID - 1) && !pending(FIRST_INTID);
    irq_enable();
    isb();
    check("hostile-doorbells", quiet && taken == before && r32(V2M_BASE + V2M_MSI_TYPER) == typer,
          "taken", taken - before);

    /* The frame as a newer macOS kernel reads it: a pair load. */
    u64 lo, hi;
    __asm__ volatile("ldp %0, %1, [%2]" : "=r"(lo), "=r"(hi) : "r"(V2M_BASE) : "memory");
    u32 wlo, whi;
    __asm__ volatile("ldp %w0, %w1, [%2]" : "=r"(wlo), "=r"(whi) : "r"(V2M_BASE + V2M_MSI_TYPER) : "memory");
    check("v2m-ldp", lo == 0 && hi == typer && wlo == typer && whi == 0, "ldp x pair high", hi);

    if (failures() == 0) {
        puts("ALL CHECKS PASSED\n");
    } else {
        puts("CHECKS FAILED: ");
        put_dec(failures());
        puts("\n");
    }
    system_off();
}

void secondary_main(u64 context)
{
    (void)context;
}
