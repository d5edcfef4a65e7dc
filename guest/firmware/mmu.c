/*
 * Identity-mapped translation tables shared by both CPUs (Arm ARM D8:
 * VMSAv8-64, 4 KiB granule, 39-bit VAs starting at level 1).
 *
 * The first two GiB are mapped with 2 MiB blocks, Device-nGnRnE inside
 * [DEVICE_START, DEVICE_END) and Normal write-back elsewhere; the rest of
 * the low 256 GiB with 1 GiB Normal blocks. One extra 4 KiB page at
 * TEST_VA lets the TLB check remap it between two physical pages.
 */
#include "lib.h"
#include "mmu.h"

#define DESC_TABLE   0x3ul
#define DESC_BLOCK   0x1ul
#define DESC_PAGE    0x3ul
#define DESC_AF      (1ul << 10)
#define DESC_SH_INNER (3ul << 8)
#define ATTR_DEVICE  (0ul << 2) /* MAIR attr 0: Device-nGnRnE */
#define ATTR_NORMAL  (1ul << 2) /* MAIR attr 1: Normal WB */
#define MAIR_VALUE   0xff00ul

/* T0SZ = 25 (39-bit VA), inner/outer WB, inner shareable, 4 KiB, no
 * TTBR1 walks (EPD1), 40-bit IPS. */
#define TCR_VALUE ((25ul) | (1ul << 8) | (1ul << 10) | (3ul << 12) | (1ul << 23) | (2ul << 32))
#define SCTLR_M (1ul << 0)
#define SCTLR_C (1ul << 2)
#define SCTLR_I (1ul << 12)

extern char __scratch[];

static u64 *table(int n) { return (u64 *)(__scratch + n * 4096); }

u64 *test_page(int which) { return (u64 *)(__scratch + TEST_PAGE_OFFSET + which * 4096); }

static u64 block(u64 pa)
{
    u64 attr = (pa >= DEVICE_START && pa < DEVICE_END) ? ATTR_DEVICE : (ATTR_NORMAL | DESC_SH_INNER);
    return pa | attr | DESC_AF;
}

void mmu_build(void)
{
    u64 *l1 = table(0), *l2_gb0 = table(1), *l2_gb1 = table(2), *l2_test = table(3), *l3 = table(4);
    for (int i = 0; i < 512; i++) {
        l2_gb0[i] = block((u64)i << 21) | DESC_BLOCK;
        l2_gb1[i] = block((1ul << 30) + ((u64)i << 21)) | DESC_BLOCK;
        l2_test[i] = 0;
        l3[i] = 0;
        l1[i] = i >= 2 && i < 256 ? block((u64)i << 30) | DESC_BLOCK : 0;
    }
    l1[0] = (u64)l2_gb0 | DESC_TABLE;
    l1[1] = (u64)l2_gb1 | DESC_TABLE;
    l1[TEST_VA >> 30] = (u64)l2_test | DESC_TABLE;
    l2_test[0] = (u64)l3 | DESC_TABLE;
    test_page(0)[0] = TEST_MARKER(0);
    test_page(1)[0] = TEST_MARKER(1);
    mmu_map_test_page(0);
    dsb_ish();
}

void mmu_map_test_page(int which)
{
    table(4)[0] = (u64)test_page(which) | ATTR_NORMAL | DESC_SH_INNER | DESC_AF | DESC_PAGE;
}

void mmu_enable(void)
{
    SYSREG_WRITE("mair_el1", MAIR_VALUE);
    SYSREG_WRITE("tcr_el1", TCR_VALUE);
    SYSREG_WRITE("ttbr0_el1", (u64)table(0));
    isb();
    __asm__ volatile("tlbi vmalle1\n dsb nsh\n isb" ::: "memory");
    u64 sctlr = SYSREG_READ("sctlr_el1");
    SYSREG_WRITE("sctlr_el1", sctlr | SCTLR_M | SCTLR_C | SCTLR_I);
    isb();
}
