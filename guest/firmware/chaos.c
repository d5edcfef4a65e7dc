/*
 * The hostile guest. With interrupts masked, it writes pseudo-random
 * values of every width, aligned and not, to every MMIO region of the
 * machine and to holes between them, reads them back, then writes and
 * reads every system register encoding (op0 2 and 3) through generated
 * MSR/MRS instructions. Any synchronous exception skips the offending
 * instruction. A VMM passes if it survives: the program then prints
 * "CHAOS DONE ..." and powers off.
 *
 * Spared: the writes that would destroy the probe itself (see
 * write_allowed) and the pvpanic panic bit, which would end the run by
 * design rather than by a VMM failure.
 */
#include "lib.h"

extern char __scratch[];

static volatile u64 skipped;
static u64 mmio_accesses, sysreg_accesses;
static u64 seed; /* zero-initialised: there is no .data */

static u64 next(void)
{
    seed ^= seed << 13;
    seed ^= seed >> 7;
    seed ^= seed << 17;
    return seed;
}

void exception_handler(u64 kind, struct frame *frame)
{
    (void)kind;
    skipped++;
    frame->elr += 4;
}

struct region {
    u64 base, size, step;
};

#if defined(PLATFORM_VMAPPLE)
static const struct region regions[] = {
    {0x00000000, 0x100000, 0x1000},    /* hole below the ROM */
    {0x00200000, 0x200000, 0x1000},    /* hole between ROM and cfg */
    {0x10000000, 0x10000, 4},          /* GIC distributor */
    {0x10010000, 0x400000, 4},         /* GIC redistributors */
    {0x20000000, 0x10000, 0x100},      /* hole */
    {0x20050000, 0x1000, 4},           /* PL031 */
    {0x20060000, 0x1000, 4},           /* PL061 */
    {0x30000000, 0x200000, 4},         /* backdoor block interface */
    {0x30200000, 0x10000, 4},          /* GFX */
    {0x30210000, 0x10000, 4},          /* GFX IOSFC */
    {0x30220000, 0x4000, 4},           /* AES window 1 */
    {0x30230000, 0x4000, 4},           /* AES window 2 */
    {0x30240000, 0x10000, 0x100},      /* hole */
    {0x40000000, 0x1000000, 0x40},     /* ECAM, first 16 MiB */
    {0x50000000, 0x20000000, 0x10000}, /* PCI MMIO window (sampled) */
    {0x10000000000ul, 0x100000, 0x1000}, /* far above RAM */
};
#define PVPANIC_BASE 0x20070000ul
#else
static const struct region regions[] = {
    {0x08000000, 0x10000, 4},   /* GIC distributor */
    {0x080a0000, 0x40000, 4},   /* GIC redistributors (2 CPUs) */
    {0x09010000, 0x1000, 4},    /* PL031 */
    {0x0c000000, 0x100000, 0x1000}, /* hole */
};
#endif

static void poke(u64 addr)
{
    u64 value = next();
    switch (value & 7) {
    case 0: *(volatile u8 *)addr = (u8)value; (void)*(volatile u8 *)addr; break;
    case 1: *(volatile u16 *)(addr & ~1ul) = (u16)value; (void)*(volatile u16 *)(addr & ~1ul); break;
    case 2: *(volatile u32 *)addr = (u32)value; (void)*(volatile u32 *)addr; break;
    case 3: *(volatile u64 *)(addr & ~7ul) = value; (void)*(volatile u64 *)(addr & ~7ul); break;
    /* Unaligned: an alignment fault on Device memory, skipped. */
    case 4: *(volatile u32 *)(addr + 1) = (u32)value; break;
    case 5: (void)*(volatile u64 *)(addr + 2); break;
    default: (void)*(volatile u32 *)addr; break;
    }
    mmio_accesses++;
}

static void probe_mmio(void)
{
    for (unsigned i = 0; i < sizeof(regions) / sizeof(regions[0]); i++) {
        const struct region *r = &regions[i];
        for (u64 off = 0; off < r->size; off += r->step)
            poke(r->base + off);
    }
#if defined(PLATFORM_VMAPPLE)
    /* pvpanic: reads, and writes without the panic bits. */
    (void)*(volatile u8 *)PVPANIC_BASE;
    *(volatile u8 *)PVPANIC_BASE = 0;
    *(volatile u8 *)(PVPANIC_BASE + 1) = 0;
    mmio_accesses += 3;
#endif
}

/* Encoding of (op0, op1, CRn, CRm, op2) as the sysreg field of MRS/MSR. */
static u32 sysreg(u32 op0, u32 op1, u32 crn, u32 crm, u32 op2)
{
    return (op0 << 19) | (op1 << 16) | (crn << 12) | (crm << 8) | (op2 << 5);
}

/* Writes that would break the probe rather than test the VMM. */
static int write_allowed(u32 reg)
{
    return reg != sysreg(3, 0, 1, 0, 0)      /* SCTLR_EL1 */
        && reg != sysreg(3, 0, 12, 0, 0)     /* VBAR_EL1 */
        && reg != sysreg(3, 0, 4, 2, 0)      /* SPSel */
        && reg != sysreg(3, 3, 4, 2, 1)      /* DAIF: unmasking would take junk interrupts forever */
        && reg != sysreg(2, 0, 0, 2, 2)      /* MDSCR_EL1: single-step would trap every step */
        && reg != sysreg(3, 0, 1, 0, 2);     /* CPACR_EL1: not ours to break (FP state) */
}

typedef u64 (*probe_fn)(u64);

/* Runs one generated instruction: "msr/mrs <reg>, x0; ret" in RAM. */
static u64 run_generated(u32 insn, u64 x0)
{
    u32 *code = (u32 *)(__scratch + 0x20000);
    code[0] = insn;
    code[1] = 0xd65f03c0u; /* ret */
    __asm__ volatile("dc cvau, %0\n dsb ish\n ic ivau, %0\n dsb ish\n isb" ::"r"(code) : "memory");
    return ((probe_fn)code)(x0);
}

static void probe_sysregs(void)
{
    for (u32 op0 = 2; op0 <= 3; op0++)
        for (u32 op1 = 0; op1 < 8; op1++)
            for (u32 crn = 0; crn < 16; crn++)
                for (u32 crm = 0; crm < 16; crm++)
                    for (u32 op2 = 0; op2 < 8; op2++) {
                        u32 reg = sysreg(op0, op1, crn, crm, op2);
                        if (write_allowed(reg)) {
                            run_generated(0xd5000000u | reg, next()); /* msr reg, x0 */
                            sysreg_accesses++;
                        }
                        run_generated(0xd5200000u | reg, 0); /* mrs x0, reg */
                        sysreg_accesses++;
                    }
}

/* Puts the console back the way it was, so the summary is readable. */
static void restore_uart(void)
{
    mmio_write32(UART_BASE + 0x038, 0);     /* IMSC */
    mmio_write32(UART_BASE + 0x02c, 0x70);  /* LCR_H: 8 bits, FIFO */
    mmio_write32(UART_BASE + 0x030, 0x301); /* CR: UART, TX, RX on */
}

void main(void)
{
    seed = 0x9e3779b97f4a7c15ul;
    puts("vmapple chaos guest\n");
    probe_mmio();
    probe_sysregs();
    restore_uart();
    puts("\nCHAOS DONE mmio=");
    put_dec(mmio_accesses);
    puts(" sysregs=");
    put_dec(sysreg_accesses);
    puts(" skipped=");
    put_dec(skipped);
    puts("\n");
    system_off();
}

/* CPU 1 is never started by this program. */
void secondary_main(u64 context)
{
    (void)context;
}
