/* The little runtime the test programs share: MMIO, console, PSCI, GIC,
 * system registers, results. */
#ifndef LIB_H
#define LIB_H

#include "platform.h"

typedef unsigned long u64;
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
typedef long s64;

#define NULL ((void *)0)

/* What the vector stub saved; exception_handler may change it. */
struct frame {
    u64 x[19]; /* x0-x18 */
    u64 x29, x30, elr, spsr, pad;
};

/* Exception kinds: the vector slot (start.S). */
#define EXC_SYNC_SPX 4
#define EXC_IRQ_SPX  5

/* Provided by each program. */
void exception_handler(u64 kind, struct frame *frame);

/* System registers by encoding, so the assembler needs no names. */
#define SYSREG_READ(enc) ({ u64 v_; __asm__ volatile("mrs %0, " enc : "=r"(v_)); v_; })
#define SYSREG_WRITE(enc, v) __asm__ volatile("msr " enc ", %0" ::"r"((u64)(v)) : "memory")

#define ICC_PMR_EL1     "S3_0_C4_C6_0"
#define ICC_IAR1_EL1    "S3_0_C12_C12_0"
#define ICC_EOIR1_EL1   "S3_0_C12_C12_1"
#define ICC_BPR1_EL1    "S3_0_C12_C12_3"
#define ICC_SRE_EL1     "S3_0_C12_C12_5"
#define ICC_IGRPEN1_EL1 "S3_0_C12_C12_7"
#define ICC_SGI1R_EL1   "S3_0_C12_C11_5"
#define CNTFRQ_EL0      "S3_3_C14_C0_0"
#define CNTVCT_EL0      "S3_3_C14_C0_2"
#define CNTV_CTL_EL0    "S3_3_C14_C3_1"
#define CNTV_CVAL_EL0   "S3_3_C14_C3_2"
#define MPIDR_EL1       "S3_0_C0_C0_5"

static inline u32 mmio_read32(u64 addr) { return *(volatile u32 *)addr; }
static inline void mmio_write32(u64 addr, u32 v) { *(volatile u32 *)addr = v; }
static inline u64 counter(void) { __asm__ volatile("isb"); return SYSREG_READ(CNTVCT_EL0); }
static inline void irq_enable(void) { __asm__ volatile("msr daifclr, #2" ::: "memory"); }
static inline void irq_disable(void) { __asm__ volatile("msr daifset, #2" ::: "memory"); }
static inline void dsb_ish(void) { __asm__ volatile("dsb ish" ::: "memory"); }
static inline void isb(void) { __asm__ volatile("isb" ::: "memory"); }
static inline void cpu_relax(void) { __asm__ volatile("yield" ::: "memory"); }

void putc(char c);
void puts(const char *s);
void put_hex(u64 v);
void put_dec(u64 v);

/* PSCI over HVC (Arm DEN 0022). */
#define PSCI_VERSION      0x84000000UL
#define PSCI_CPU_OFF      0x84000002UL
#define PSCI_CPU_ON       0xc4000003UL
#define PSCI_AFFINITY     0xc4000004UL
#define PSCI_SYSTEM_OFF   0x84000008UL
u64 hvc(u64 fn, u64 a1, u64 a2, u64 a3);
void system_off(void) __attribute__((noreturn));

/* GICv3 bring-up for the calling CPU (and the distributor, on CPU 0). */
void gic_init_distributor(void);
void gic_init_cpu(u32 cpu);
void gic_enable_private(u32 cpu, u32 intid, u8 priority);
void gic_send_sgi(u32 sgi, u32 target_cpu);

/* Results. */
void check(const char *name, int ok, const char *detail, u64 value);
u32 failures(void);

/* Spin until *flag == want or the counter passes `ticks`; 1 on success. */
int wait_for(volatile u64 *flag, u64 want, u64 ticks);

#endif
