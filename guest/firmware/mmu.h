#ifndef MMU_H
#define MMU_H

#include "lib.h"

/* A VA in its own 1 GiB slot, remapped by the TLB check. */
#define TEST_VA 0x4000000000ul
#define TEST_MARKER(n) (0x5a5a000000000000ul | ((n) + 1))
#define TEST_PAGE_OFFSET 0x5000

void mmu_build(void);
void mmu_enable(void);
void mmu_map_test_page(int which);
u64 *test_page(int which);

#endif
