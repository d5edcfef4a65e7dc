/*
 * What macOS 13+ guests need from the machine and the CPU (docs/macos.md,
 * "Current macOS guests"), checked from a bare-metal guest:
 *
 *  - mmio-*: every load/store form a data abort reports without an
 *    instruction syndrome (forms.S), run once on RAM and once on a window
 *    of GIC distributor priority bytes, with the MMU off and then on,
 *    leaves the same registers, writeback and memory.
 *  - hvc-*: Apple's CPU-service hypercalls (XNU's hv_hvc.h) answer as
 *    Hypervisor.framework's vmapple mode does, load the pointer-
 *    authentication key registers, and signed pointers authenticate with
 *    the keys they load (pac-*).
 *  - avp-rtc-*: the avp,rtc clock answers iBoot's 0xF001 probe, counts
 *    microseconds since the epoch (agreeing with the PL031's seconds) and
 *    never runs slower than the guest's own counter.
 *
 * Prints PASS/FAIL lines, then ALL CHECKS PASSED or CHECKS FAILED: n, and
 * powers off.
 */
#include "lib.h"
#include "mmu.h"

/* GICD_IPRIORITYR bytes of INTIDs 64..191: plain storage (5 bits kept). */
#define MMIO_WINDOW (GICD_BASE + 0x400 + 64)
#define WINDOW_BYTES 128
#define CPACR_FPEN (3ul << 20)

typedef void form_fn(u64 addr, u64 out[8]);
#define F(name) extern form_fn form_##name;
#define FORMS(X)                                                            \
    X(ldr_x) X(str_w_pre) X(str_x_post) X(ldr_w_pre) X(ldr_x_post)          \
    X(strb_post) X(strh_pre) X(ldrb_pre) X(ldrh_post) X(ldrsb_x_post)       \
    X(ldrsb_w_pre) X(ldrsh_x_pre) X(ldrsh_w_post) X(ldrsw_post)             \
    X(ldr_x_reg_lsl) X(ldr_w_reg_sxtw) X(strb_reg) X(ldrsh_reg_uxtw)        \
    X(str_x_reg_sxtx) X(ldp_x) X(ldp_w_pre) X(ldp_x_post) X(stp_x)          \
    X(stp_w_pre) X(stp_x_post) X(ldpsw) X(ldnp_x) X(stnp_w) X(ldr_b_post)   \
    X(str_h_pre) X(ldr_s) X(str_d_post) X(ldr_q_pre) X(str_q) X(ldr_d_reg)  \
    X(ldp_s) X(ldp_d_pre) X(stp_q_post) X(ldp_q) X(stp_d)
FORMS(F)

struct form {
    const char *name;
    form_fn *fn;
};
#define ENTRY(name) {#name, form_##name},
static const struct form forms[] = {FORMS(ENTRY)};


/* Apple's CPU service (XNU osfmk/arm64/hv_hvc.h). */
#define PAC_SET_INITIAL_STATE 0xc1000000ul
#define PAC_GET_DEFAULT_KEYS  0xc1000001ul
#define PAC_SET_A_KEYS        0xc1000002ul
#define PAC_SET_B_KEYS        0xc1000003ul
#define PAC_SET_EL0_DIV       0xc1000004ul
#define PAC_SET_EL0_DIV_EL1   0xc1000005ul
#define PAC_SET_G_KEY         0xc1000006ul
#define PAC_NOP               0xc10000f0ul
#define CPU_UID               0x8100ff01ul

#define APIAKEYLO "S3_0_C2_C1_0"
#define APIAKEYHI "S3_0_C2_C1_1"
#define APIBKEYLO "S3_0_C2_C1_2"
#define APIBKEYHI "S3_0_C2_C1_3"
#define APDAKEYLO "S3_0_C2_C2_0"
#define APDAKEYHI "S3_0_C2_C2_1"
#define APDBKEYLO "S3_0_C2_C2_2"
#define APDBKEYHI "S3_0_C2_C2_3"
#define APGAKEYLO "S3_0_C2_C3_0"
#define APGAKEYHI "S3_0_C2_C3_1"
#define SCTLR_ENIA (1ul << 31)
#define SCTLR_ENIB (1ul << 30)
#define SCTLR_ENDA (1ul << 27)
#define SCTLR_ENDB (1ul << 13)

struct regs5 {
    u64 x[5];
};

static struct regs5 hvc5(u64 fn, u64 a1, u64 a2)
{
    register u64 x0 __asm__("x0") = fn;
    register u64 x1 __asm__("x1") = a1;
    register u64 x2 __asm__("x2") = a2;
    register u64 x3 __asm__("x3") = 0;
    register u64 x4 __asm__("x4") = 0;
    __asm__ volatile("hvc #0" : "+r"(x0), "+r"(x1), "+r"(x2), "+r"(x3), "+r"(x4)::"memory");
    struct regs5 r = {{x0, x1, x2, x3, x4}};
    return r;
}

/* PACIA/AUTIA/PACIB/AUTIB/PACDA/AUTDA/PACGA by encoding (x9 = x9 op x10). */
#define PAC_OP(name, word)                                                   \
    static u64 name(u64 ptr, u64 modifier)                                    \
    {                                                                         \
        register u64 x9 __asm__("x9") = ptr;                                  \
        register u64 x10 __asm__("x10") = modifier;                           \
        __asm__ volatile(".inst " #word : "+r"(x9) : "r"(x10));               \
        return x9;                                                            \
    }
PAC_OP(pacia, 0xdac10149)
PAC_OP(autia, 0xdac11149)
PAC_OP(pacib, 0xdac10549)
PAC_OP(autib, 0xdac11549)
PAC_OP(pacda, 0xdac10949)
PAC_OP(autda, 0xdac11949)

static u64 pacga(u64 value, u64 modifier)
{
    register u64 x9 __asm__("x9") = value;
    register u64 x10 __asm__("x10") = value;
    register u64 x11 __asm__("x11") = modifier;
    __asm__ volatile(".inst 0x9acb3149" : "+r"(x9) : "r"(x10), "r"(x11));
    return x9;
}

static int keys_are(u64 ia, u64 da, u64 ib, u64 db, u64 ga)
{
    return SYSREG_READ(APIAKEYLO) == ia && SYSREG_READ(APIAKEYHI) == ia + 1 &&
           SYSREG_READ(APDAKEYLO) == da && SYSREG_READ(APDAKEYHI) == da + 1 &&
           SYSREG_READ(APIBKEYLO) == ib && SYSREG_READ(APIBKEYHI) == ib + 1 &&
           SYSREG_READ(APDBKEYLO) == db && SYSREG_READ(APDBKEYHI) == db + 1 &&
           SYSREG_READ(APGAKEYLO) == ga && SYSREG_READ(APGAKEYHI) == ga + 1;
}

/* A pointer signs to something else and authenticates back. */
static int round_trip(u64 (*sign)(u64, u64), u64 (*auth)(u64, u64), u64 ptr)
{
    u64 signed_ptr = sign(ptr, 0x1234);
    return signed_ptr != ptr && auth(signed_ptr, 0x1234) == ptr && auth(signed_ptr, 0x1235) != ptr;
}

static void check_hypercalls(void)
{
    struct regs5 r = hvc5(PAC_NOP, 0, 0);
    check("hvc-nop", r.x[0] == 0, "x0", r.x[0]);

    /* Clear two keys so that the call visibly loads them. */
    SYSREG_WRITE(APIAKEYLO, 0);
    SYSREG_WRITE(APGAKEYHI, 0);
    r = hvc5(PAC_SET_INITIAL_STATE, 0, 0);
    check("hvc-set-initial-state", r.x[0] == 0, "x0", r.x[0]);
    check("hvc-initial-keys",
          keys_are(0xfeedfacefeedfacful, 0xfeedfacefeedfad1ul, 0xfeedfacefeedfad5ul,
                   0xfeedfacefeedfad7ul, 0xfeedfacefeedfad9ul),
          "APIAKeyLo", SYSREG_READ(APIAKEYLO));

    r = hvc5(PAC_GET_DEFAULT_KEYS, 0, 0);
    check("hvc-get-default-keys",
          r.x[0] == 0 && r.x[1] == 0xfeedfacefeedfacful && r.x[2] == 0xfeedfacefeedfad5ul &&
              r.x[3] == 0xfeedfacefeedfad3ul && r.x[4] == 0xfeedfacefeedfad9ul,
          "x1", r.x[1]);

    /* Sign with the initial keys, then change them. */
    SYSREG_WRITE("sctlr_el1",
                 SYSREG_READ("sctlr_el1") | SCTLR_ENIA | SCTLR_ENIB | SCTLR_ENDA | SCTLR_ENDB);
    isb();
    u64 ptr = RAM_BASE + 0x1230;
    u64 signed_a = pacia(ptr, 7);
    u64 signed_b = pacib(ptr, 7);
    u64 generic = pacga(ptr, 7);
    check("pac-initial-keys",
          round_trip(pacia, autia, ptr) && round_trip(pacib, autib, ptr) &&
              round_trip(pacda, autda, ptr),
          "signed", signed_a);

    r = hvc5(PAC_SET_A_KEYS, 0x1000, 0);
    check("hvc-set-a-keys",
          r.x[0] == 0 && keys_are(0x1000, 0x1002, 0xfeedfacefeedfad5ul, 0xfeedfacefeedfad7ul,
                                  0xfeedfacefeedfad9ul),
          "APIAKeyLo", SYSREG_READ(APIAKEYLO));
    check("pac-a-keys-changed", autia(signed_a, 7) != ptr && round_trip(pacia, autia, ptr),
          "autia with the new key", autia(signed_a, 7));
    check("pac-b-key-kept", autib(signed_b, 7) == ptr, "autib", autib(signed_b, 7));

    r = hvc5(PAC_SET_B_KEYS, 0x2000, 0);
    check("hvc-set-b-keys",
          r.x[0] == 0 && keys_are(0x1000, 0x1002, 0x2000, 0x2002, 0xfeedfacefeedfad9ul),
          "APIBKeyLo", SYSREG_READ(APIBKEYLO));
    check("pac-b-keys-changed", autib(signed_b, 7) != ptr && round_trip(pacib, autib, ptr),
          "autib", autib(signed_b, 7));

    r = hvc5(PAC_SET_G_KEY, 0x3000, 0);
    check("hvc-set-g-key", r.x[0] == 0 && keys_are(0x1000, 0x1002, 0x2000, 0x2002, 0x3000),
          "APGAKeyLo", SYSREG_READ(APGAKEYLO));
    check("pac-g-key-changed", pacga(ptr, 7) != generic, "pacga", generic);

    r = hvc5(PAC_SET_EL0_DIV, 0x4000, 0);
    check("hvc-set-el0-diversifier", r.x[0] == 0, "x0", r.x[0]);
    r = hvc5(PAC_SET_EL0_DIV_EL1, 1, 0x4000);
    check("hvc-set-el0-diversifier-at-el1",
          r.x[0] == 0 && keys_are(0x1000, 0x1002, 0x2000, 0x2002, 0x3000), "x0", r.x[0]);

    r = hvc5(0xc1000007ul, 0, 0);
    check("hvc-unknown", r.x[0] == ~0ul, "x0", r.x[0]);
    r = hvc5(CPU_UID, 0, 0);
    check("hvc-uid",
          r.x[0] == 0x9cbb6ebb && r.x[1] == 0x9dc9d679 && r.x[2] == 0xaa624e1f &&
              r.x[3] == 0x3b878185,
          "w0", r.x[0]);
}

#define AVP_RTC_BASE 0x30240000ul
#define PL031_DR     0x20050000ul
#define COUNTER_HZ   24000000ul

static void check_avp_rtc(void)
{
    check("avp-rtc-id", mmio_read32(AVP_RTC_BASE + 0x40) == 0xf001, "id",
          mmio_read32(AVP_RTC_BASE + 0x40));
    u64 seconds = mmio_read32(PL031_DR);
    u64 us = *(volatile u64 *)AVP_RTC_BASE;
    /* 2020-01-01 .. 2100-01-01 in microseconds: a seconds or nanoseconds
     * counter is far outside. */
    check("avp-rtc-epoch-us", us > 1577836800000000ul && us < 4102444800000000ul, "us", us);
    u64 from_rtc = us / 1000000;
    check("avp-rtc-matches-pl031", from_rtc + 2 >= seconds && from_rtc <= seconds + 2, "seconds",
          from_rtc);
    /* The host clock never runs slower than the guest's counter (which
     * stops while the VM is paused). */
    u64 t0 = counter();
    u64 a = *(volatile u64 *)AVP_RTC_BASE;
    while (counter() - t0 < COUNTER_HZ / 100)
        cpu_relax();
    u64 b = *(volatile u64 *)AVP_RTC_BASE;
    check("avp-rtc-advances", b - a >= 10000, "delta us", b - a);
    /* 32-bit halves, as a 32-bit driver would read them. */
    u64 hi, lo, c;
    int tries = 0;
    do {
        hi = mmio_read32(AVP_RTC_BASE + 4);
        lo = mmio_read32(AVP_RTC_BASE);
        c = *(volatile u64 *)AVP_RTC_BASE;
    } while ((c >> 32) != hi && ++tries < 3); /* the low word wrapped */
    check("avp-rtc-halves", hi == (c >> 32) && ((hi << 32) | lo) <= c, "hi", hi);
}

static u32 ram_window[WINDOW_BYTES / 4] __attribute__((aligned(64)));

void exception_handler(u64 kind, struct frame *frame)
{
    puts("unexpected exception, kind ");
    put_hex(kind);
    puts(" elr ");
    put_hex(frame->elr);
    puts(" esr ");
    put_hex(SYSREG_READ("esr_el1"));
    puts("\n");
    system_off();
}

/* Byte k of the window: bit 7 set in half of them (sign extension), the
 * low three bits clear (what the priority bytes keep). */
static void fill(u64 base)
{
    for (u32 i = 0; i < WINDOW_BYTES / 4; i++) {
        u32 word = 0;
        for (u32 j = 0; j < 4; j++)
            word |= ((0x88u + (i * 4 + j) * 0x18u) & 0xf8u) << (8 * j);
        mmio_write32(base + 4 * i, word);
    }
}

static void run_forms(const char *phase)
{
    u64 ram = (u64)ram_window;
    for (u32 f = 0; f < sizeof(forms) / sizeof(forms[0]); f++) {
        u64 out_ram[8] = {0}, out_mmio[8] = {0};
        fill(ram);
        fill(MMIO_WINDOW);
        dsb_ish();
        forms[f].fn(ram + WINDOW_BYTES / 2, out_ram);
        forms[f].fn(MMIO_WINDOW + WINDOW_BYTES / 2, out_mmio);
        dsb_ish();
        int ok = 1;
        u64 bad = 0, want = 0, got = 0;
        for (u32 i = 0; i < 8 && ok; i++) {
            if (out_ram[i] != out_mmio[i]) {
                ok = 0;
                bad = i;
                want = out_ram[i];
                got = out_mmio[i];
            }
        }
        for (u32 i = 0; i < WINDOW_BYTES / 4 && ok; i++) {
            want = mmio_read32(ram + 4 * i);
            got = mmio_read32(MMIO_WINDOW + 4 * i);
            if (want != got) {
                ok = 0;
                bad = 0x100 + 4 * i;
            }
        }
        puts(ok ? "PASS " : "FAIL ");
        puts("mmio-");
        puts(forms[f].name);
        puts(phase);
        if (!ok) {
            /* out[] slot, or 0x100 + byte offset in the window. */
            puts(": differs at ");
            put_hex(bad);
            puts(" RAM ");
            put_hex(want);
            puts(" device ");
            put_hex(got);
            check("mmio", 0, "see above", bad);
        } else {
            puts("\n");
        }
    }
}

void main(void)
{
    SYSREG_WRITE("cpacr_el1", SYSREG_READ("cpacr_el1") | CPACR_FPEN);
    isb();
    run_forms("");
    mmu_build();
    mmu_enable();
    run_forms("-mmu");
    check_hypercalls();
    check_avp_rtc();

    u32 n = failures();
    if (n == 0) {
        puts("ALL CHECKS PASSED\n");
    } else {
        puts("CHECKS FAILED: ");
        put_dec(n);
        puts("\n");
    }
    system_off();
}

void secondary_main(u64 context)
{
    (void)context;
}
