/*
 * One function per load/store form that a data abort reports without an
 * instruction syndrome (ISV = 0), for newmac.c.
 *
 *   void form_NAME(u64 addr, u64 out[8]);
 *
 * Each function sets x9, x10 and x11 and V0/V1 to fixed values, makes x8
 * the base register (= addr), executes the form once, and stores the
 * registers it may have changed into out: x9, x10, x8 - addr (the
 * writeback), then V0 and V1 (two doublewords each). newmac.c runs every
 * function on RAM and on a device register window and compares.
 *
 * Every byte of the stored values has its low three bits clear: the
 * device window is GIC priority bytes, which keep five bits.
 */
#define PAT_A 0xf8e8d8c8b8a89888
#define PAT_B 0x0818283848586878
#define PAT_C 0x90a0b0c0d0e0f000
#define PAT_D 0x4030201088786858

#define FORM(name, index, ...)                          \
    .global form_##name;                                \
    .type form_##name, %function;                       \
form_##name:                                            \
    mov x8, x0;                                         \
    ldr x9, =PAT_A;                                     \
    ldr x10, =PAT_B;                                    \
    ldr x12, =PAT_C;                                    \
    ldr x13, =PAT_D;                                    \
    fmov d0, x9;                                        \
    mov v0.d[1], x12;                                   \
    fmov d1, x10;                                       \
    mov v1.d[1], x13;                                   \
    ldr x11, =index;                                    \
    __VA_ARGS__;                                        \
    str x9, [x1, #0];                                   \
    str x10, [x1, #8];                                  \
    sub x2, x8, x0;                                     \
    str x2, [x1, #16];                                  \
    str q0, [x1, #32];                                  \
    str q1, [x1, #48];                                  \
    ret

    .text
    .balign 4
/* A plain access with a syndrome, as the reference. */
FORM(ldr_x, 0, ldr x9, [x8])
/* General registers, immediate pre/post-index. */
FORM(str_w_pre, 0, str w9, [x8, #-8]!)
FORM(str_x_post, 0, str x9, [x8], #16)
FORM(ldr_w_pre, 0, ldr w9, [x8, #8]!)
FORM(ldr_x_post, 0, ldr x9, [x8], #-16)
FORM(strb_post, 0, strb w9, [x8], #1)
FORM(strh_pre, 0, strh w9, [x8, #2]!)
FORM(ldrb_pre, 0, ldrb w9, [x8, #-1]!)
FORM(ldrh_post, 0, ldrh w9, [x8], #-2)
FORM(ldrsb_x_post, 0, ldrsb x9, [x8], #3)
FORM(ldrsb_w_pre, 0, ldrsb w9, [x8, #5]!)
FORM(ldrsh_x_pre, 0, ldrsh x9, [x8, #-6]!)
FORM(ldrsh_w_post, 0, ldrsh w9, [x8], #6)
FORM(ldrsw_post, 0, ldrsw x9, [x8], #4)
/* Register offsets, extended and scaled. */
FORM(ldr_x_reg_lsl, -2, ldr x9, [x8, x11, lsl #3])
FORM(ldr_w_reg_sxtw, -3, ldr w9, [x8, w11, sxtw #2])
FORM(strb_reg, -5, strb w9, [x8, x11])
FORM(ldrsh_reg_uxtw, 0xffffffff00000003, ldrsh x9, [x8, w11, uxtw #1])
FORM(str_x_reg_sxtx, -24, str x9, [x8, x11, sxtx])
/* Pairs. */
FORM(ldp_x, 0, ldp x9, x10, [x8])
FORM(ldp_w_pre, 0, ldp w9, w10, [x8, #-8]!)
FORM(ldp_x_post, 0, ldp x9, x10, [x8], #32)
FORM(stp_x, 0, stp x9, x10, [x8, #-16])
FORM(stp_w_pre, 0, stp w9, w10, [x8, #8]!)
FORM(stp_x_post, 0, stp x9, x10, [x8], #-32)
FORM(ldpsw, 0, ldpsw x9, x10, [x8, #-24])
FORM(ldnp_x, 0, ldnp x9, x10, [x8, #16])
FORM(stnp_w, 0, stnp w9, w10, [x8, #-4])
/* SIMD/FP registers. */
FORM(ldr_b_post, 0, ldr b0, [x8], #7)
FORM(str_h_pre, 0, str h1, [x8, #-2]!)
FORM(ldr_s, 0, ldr s1, [x8, #12])
FORM(str_d_post, 0, str d0, [x8], #-8)
FORM(ldr_q_pre, 0, ldr q0, [x8, #-32]!)
FORM(str_q, 0, str q1, [x8, #16])
FORM(ldr_d_reg, 3, ldr d1, [x8, x11, lsl #3])
FORM(ldp_s, 0, ldp s0, s1, [x8, #-8])
FORM(ldp_d_pre, 0, ldp d0, d1, [x8, #16]!)
FORM(stp_q_post, 0, stp q0, q1, [x8], #-64)
FORM(ldp_q, 0, ldp q0, q1, [x8, #-32])
FORM(stp_d, 0, stp d1, d0, [x8, #8])
    .ltorg
