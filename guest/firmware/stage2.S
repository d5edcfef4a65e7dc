/*
 * The second-stage payload of the Apple-devices test (apple.c): a
 * position-independent blob that apple.c loads from the aux disk through
 * the backdoor block interface and calls, the way Apple's boot ROM loads
 * the next stage. It prints one line on the UART whose base arrives in x0
 * and returns STAGE2_MAGIC so the caller knows the code really ran.
 */
#define UARTDR 0x000
#define UARTFR 0x018
#define UARTFR_TXFF_BIT 5

    .text
    .global _stage2
_stage2:
    adr     x1, message
1:  ldrb    w2, [x1], #1
    cbz     w2, 3f
2:  ldr     w3, [x0, #UARTFR]
    tbnz    w3, #UARTFR_TXFF_BIT, 2b
    str     w2, [x0, #UARTDR]
    b       1b
3:  movz    x0, #0x5732
    movk    x0, #0x57a6, lsl #16
    ret

message:
    .asciz  "stage 2: running, loaded from the aux disk\r\n"
