/*
 * Entry points and the exception vector table of the test programs.
 *
 * CPU 0 arrives at _start the way the vmapple machine starts it: EL1h,
 * MMU off, interrupts masked. Secondary CPUs arrive at secondary_entry
 * through PSCI CPU_ON with x0 = the context id. Every exception is saved
 * into a struct frame (lib.h) and handed to exception_handler(kind, frame),
 * which may edit the frame (chaos skips faulting instructions that way).
 */
#define FRAME_SIZE (24 * 8)
#define STACK_SIZE 16384

    .section .text.start, "ax"
    .global _start
_start:
    ldr     x1, =__stacks + STACK_SIZE
    mov     sp, x1
    adr     x1, vectors
    msr     vbar_el1, x1
    isb
    ldr     x1, =__bss_start
    ldr     x2, =__bss_end
1:  cmp     x1, x2
    b.hs    2f
    str     xzr, [x1], #8
    b       1b
2:  bl      main
3:  wfi
    b       3b

    .global secondary_entry
secondary_entry:
    ldr     x1, =__stacks + 2 * STACK_SIZE
    mov     sp, x1
    adr     x1, vectors
    msr     vbar_el1, x1
    isb
    bl      secondary_main
4:  wfi
    b       4b

    .macro vector kind
    .balign 0x80
    sub     sp, sp, #FRAME_SIZE
    stp     x0, x1, [sp, #0]
    mov     x0, #\kind
    b       exception_common
    .endm

    .balign 2048
vectors:
    vector 0    /* current EL, SP0: sync */
    vector 1    /* IRQ */
    vector 2    /* FIQ */
    vector 3    /* SError */
    vector 4    /* current EL, SPx: sync */
    vector 5    /* IRQ */
    vector 6    /* FIQ */
    vector 7    /* SError */
    vector 8    /* lower EL, AArch64 */
    vector 9
    vector 10
    vector 11
    vector 12   /* lower EL, AArch32 */
    vector 13
    vector 14
    vector 15

exception_common:
    stp     x2, x3, [sp, #16]
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
    stp     x18, x29, [sp, #144]
    mrs     x2, elr_el1
    mrs     x3, spsr_el1
    stp     x30, x2, [sp, #160]
    str     x3, [sp, #176]
    mov     x1, sp
    bl      exception_handler
    ldp     x30, x2, [sp, #160]
    ldr     x3, [sp, #176]
    msr     elr_el1, x2
    msr     spsr_el1, x3
    ldp     x2, x3, [sp, #16]
    ldp     x4, x5, [sp, #32]
    ldp     x6, x7, [sp, #48]
    ldp     x8, x9, [sp, #64]
    ldp     x10, x11, [sp, #80]
    ldp     x12, x13, [sp, #96]
    ldp     x14, x15, [sp, #112]
    ldp     x16, x17, [sp, #128]
    ldp     x18, x29, [sp, #144]
    ldp     x0, x1, [sp, #0]
    add     sp, sp, #FRAME_SIZE
    eret
