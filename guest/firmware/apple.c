/*
 * The Apple platform devices of the vmapple machine, exercised the way the
 * boot ROM uses them (vmapple-machine.md sections 8-10, 12, 13):
 *
 *   cfg region     every field the machine fills, against the values the
 *                  test passes on the command line;
 *   BDIF           a header from the aux disk, then a second-stage payload
 *                  (stage2.S) loaded through the backdoor and called; a
 *                  pattern from the root disk; error statuses;
 *   AES            known ciphertexts (built-in key, FIPS-197, CBC) and the
 *                  FLAG interrupt on SPI 0x12;
 *   PL031          a plausible wall-clock time and the match interrupt;
 *   pvpanic        the advertised events and a crash-loaded event;
 *   PL061          the power button: the test asks the VMM to power down
 *                  (SIGTERM) when this program says it is waiting; the
 *                  rising edge on line 3 interrupts, the pulse ends, and
 *                  the program powers off.
 *
 * Expected command line: --cpus 2 --memory 256M --ecid 0x1122334455667788.
 */
#include "lib.h"

#ifndef PLATFORM_VMAPPLE
#error "apple.c tests vmapple's own devices"
#endif

#define CFG_BASE      0x00400000UL
#define RTC_BASE      0x20050000UL
#define GPIO_BASE     0x20060000UL
#define PVPANIC_BASE  0x20070000UL
#define BDIF_BASE     0x30000000UL
#define BDIF_ROOT     0x00000000UL
#define BDIF_AUX      0x00010000UL
#define BDIF_CMD      0x408
#define AES_BASE      0x30220000UL

#define EXPECT_CPUS   2
#define EXPECT_RAM    (256UL << 20)
#define EXPECT_ECID   0x1122334455667788UL

#define INTID_RTC     (32 + 2)
#define INTID_GPIO    (32 + 5)
#define INTID_AES     (32 + 0x12)

extern u8 __scratch[];

static volatile u64 aes_irqs, aes_irq_status;
static volatile u64 rtc_irqs;
static volatile u64 button_irqs, button_mis, button_data_at_irq;

static inline u8 mmio_read8(u64 addr) { return *(volatile u8 *)addr; }
static inline void mmio_write8(u64 addr, u8 v) { *(volatile u8 *)addr = v; }
static inline u64 mmio_read64(u64 addr) { return *(volatile u64 *)addr; }
static inline void mmio_write64(u64 addr, u64 v) { *(volatile u64 *)addr = v; }

static void *memset_(void *d, int c, u64 n)
{
    volatile u8 *p = d;
    while (n--)
        *p++ = (u8)c;
    return d;
}

static int memeq(const void *a, const void *b, u64 n)
{
    const volatile u8 *x = a, *y = b;
    for (u64 i = 0; i < n; i++)
        if (x[i] != y[i])
            return 0;
    return 1;
}

static int streq_field(const u8 *field, const char *want)
{
    u64 i = 0;
    for (; want[i]; i++)
        if (field[i] != (u8)want[i])
            return 0;
    for (; i < 32; i++)
        if (field[i])
            return 0;
    return 1;
}

/* ---- GIC: one SPI, group 1, level, routed to CPU 0 ---- */
#define GICD_IGROUPR    0x0080
#define GICD_ISENABLER  0x0100
#define GICD_IPRIORITYR 0x0400
#define GICD_IROUTER    0x6000

static void gic_enable_spi(u32 intid)
{
    u64 bit = 1u << (intid % 32), word = 4 * (intid / 32);
    mmio_write32(GICD_BASE + GICD_IGROUPR + word, mmio_read32(GICD_BASE + GICD_IGROUPR + word) | bit);
    mmio_write8(GICD_BASE + GICD_IPRIORITYR + intid, 0x80);
    mmio_write64(GICD_BASE + GICD_IROUTER + 8 * intid, 0);
    mmio_write32(GICD_BASE + GICD_ISENABLER + word, bit);
}

/* ---- cfg region (section 8.2, actual layout) ---- */
static void test_cfg(void)
{
    const u8 *cfg = (const u8 *)CFG_BASE;
    u32 version = mmio_read32(CFG_BASE + 0x000);
    check("cfg-version", version == 2, "version", version);
    check("cfg-nr-cpus", mmio_read32(CFG_BASE + 0x004) == EXPECT_CPUS, "nr_cpus", mmio_read32(CFG_BASE + 0x004));
    check("cfg-unknown-words",
          mmio_read32(CFG_BASE + 0x008) == 1 && mmio_read32(CFG_BASE + 0x00c) == 1 &&
              mmio_read32(CFG_BASE + 0x010) == 0x20 && mmio_read32(CFG_BASE + 0x014) == 0 &&
              mmio_read32(CFG_BASE + 0x02c) == 1 && mmio_read32(CFG_BASE + 0x030) == 1 &&
              mmio_read32(CFG_BASE + 0x580) == 1,
          "unk1..unk10", 0);
    check("cfg-ecid", mmio_read64(CFG_BASE + 0x018) == EXPECT_ECID, "ecid", mmio_read64(CFG_BASE + 0x018));
    check("cfg-ram-size", mmio_read64(CFG_BASE + 0x020) == EXPECT_RAM, "ram_size", mmio_read64(CFG_BASE + 0x020));
    check("cfg-cpu-ids",
          mmio_read32(CFG_BASE + 0x100) == 0 && mmio_read32(CFG_BASE + 0x104) == 1 &&
              mmio_read32(CFG_BASE + 0x108) == 0,
          "cpu_ids[1]", mmio_read32(CFG_BASE + 0x104));
    check("cfg-strings",
          streq_field(cfg + 0x500, "1234") && streq_field(cfg + 0x520, "D/A") &&
              streq_field(cfg + 0x540, "VM0001") && streq_field(cfg + 0x584, "Apple M1 (Virtual)"),
          "serial/unk8/model/soc_name", 0);
    u64 tail = 0;
    for (u64 off = 0x5a8; off < 0x10000; off += 8)
        tail |= mmio_read64(CFG_BASE + off);
    check("cfg-tail-zero", tail == 0, "OR of bytes after the structure", tail);
    puts("cfg rnd ");
    put_hex(mmio_read32(CFG_BASE + 0x038));
    puts("\n");
}

/* ---- backdoor block interface (section 9) ---- */
struct bdif_request {
    u64 sector_addr;
    u32 sector_len, sector_flags;
    u64 data_addr;
    u32 data_len, data_flags;
    u64 retval_addr;
    u32 retval_len, retval_flags;
};
#define BDIF_READ  0x00030001u
#define BDIF_WRITE 0x00010001u

/* Reads `len` bytes from 512-byte sector `sector` of a window into `dst`;
 * returns the status byte (0 ok, 1 failure). */
static u8 bdif_io(u64 window, u32 op, u32 sector, void *dst, u32 len)
{
    volatile struct bdif_request *req = (void *)(__scratch + 0x1000);
    volatile u32 *sector_block = (void *)(__scratch + 0x1100);
    volatile u8 *status = __scratch + 0x1200;
    sector_block[2] = sector;
    req->sector_addr = (u64)sector_block;
    req->sector_len = 16;
    req->data_addr = (u64)dst;
    req->data_len = len;
    req->data_flags = op;
    req->retval_addr = (u64)status;
    *status = 0xee;
    dsb_ish();
    mmio_write64(BDIF_BASE + window + BDIF_CMD, (u64)req);
    dsb_ish();
    return *status;
}

struct stage2_header {
    char magic[8];
    u32 length, sector;
};
#define STAGE2_MAGIC 0x57a65732UL

static void test_bdif(void)
{
    check("bdif-registers",
          mmio_read32(BDIF_BASE + 0x0) == 1 && mmio_read32(BDIF_BASE + 0x4) == 2 &&
              mmio_read32(BDIF_BASE + 0x408) == 0xffffffffu,
          "CMD", mmio_read32(BDIF_BASE + 0x408));

    struct stage2_header *header = (void *)(__scratch + 0x2000);
    u8 st = bdif_io(BDIF_AUX, BDIF_READ, 0, header, 512);
    int header_ok = st == 0 && memeq(header->magic, "VMAPSTG2", 8) && header->length > 0 &&
                    header->length <= 0x10000;
    check("bdif-aux-header", header_ok, "status", st);
    if (header_ok) {
        u8 *code = __scratch + 0x100000;
        st = bdif_io(BDIF_AUX, BDIF_READ, header->sector, code, header->length);
        check("bdif-aux-payload", st == 0, "status", st);
        /* Fresh code: clean to the point of unification, drop stale
         * instructions, then call it. */
        for (u64 off = 0; off < header->length; off += 4) {
            __asm__ volatile("dc cvau, %0" ::"r"(code + off) : "memory");
        }
        dsb_ish();
        for (u64 off = 0; off < header->length; off += 4) {
            __asm__ volatile("ic ivau, %0" ::"r"(code + off) : "memory");
        }
        dsb_ish();
        isb();
        u64 (*stage2)(u64) = (u64 (*)(u64))code;
        u64 magic = stage2(UART_BASE);
        check("bdif-stage2-ran", magic == STAGE2_MAGIC, "stage 2 returned", magic);
    }

    u8 *root = __scratch + 0x3000;
    st = bdif_io(BDIF_ROOT, BDIF_READ, 3, root, 512);
    check("bdif-root-read", st == 0 && memeq(root, "vmapple root disk, sector 3", 27), "status", st);
    /* NEXT_DEVICE is the disk's size in sectors (QEMU: a fixed 64 GiB).
     * AVPBooter reads the backup GPT header at its last sector: that read
     * works, one sector further does not. */
    u32 sectors = mmio_read32(BDIF_BASE + 0x420);
    u8 at_last = bdif_io(BDIF_ROOT, BDIF_READ, sectors - 1, root, 512);
    u8 past = bdif_io(BDIF_ROOT, BDIF_READ, sectors, root, 512);
    check("bdif-root-last-sector", at_last == 0 && past == 1, "NEXT_DEVICE(root)", sectors);

    memset_(root, 0x5a, 512);
    st = bdif_io(BDIF_ROOT, BDIF_WRITE, 3, root, 512);
    check("bdif-write-refused", st == 1, "status", st);
    st = bdif_io(BDIF_ROOT, BDIF_READ, 0x7fffffff, root, 512);
    check("bdif-past-end", st == 1 && root[0] == 0x5a, "status", st);
    st = bdif_io(BDIF_ROOT, BDIF_READ, 0, (void *)0x08000000UL, 512);
    check("bdif-dma-unmapped", st == 1, "status", st);
    st = bdif_io(BDIF_ROOT, BDIF_READ, 0, root, 0x08000001);
    check("bdif-too-long", st == 1, "status", st);
}

/* ---- AES engine (section 10) ---- */
#define AES_IRQ_STATUS 0x018
#define AES_IRQ_ENABLE 0x01c
#define AES_FLAG_INFO  0x030
#define AES_FIFO       0x200

static void aes_push(u32 word)
{
    mmio_write32(AES_BASE + AES_FIFO, word);
}

static void aes_data(u32 len, const void *src, void *dst)
{
    u64 s = (u64)src, d = (u64)dst;
    aes_push(0x50000000u | len);
    aes_push((u32)(((s >> 32) & 0xffff) << 16 | ((d >> 32) & 0xffff)));
    aes_push((u32)s);
    aes_push((u32)d);
}

static const u8 zero_block_key1[16] = {0x52, 0x91, 0x7f, 0x3a, 0xe9, 0x57, 0xd5, 0x23,
                                       0x0d, 0x3a, 0x2a, 0xf5, 0x7c, 0x7b, 0x5a, 0x71};
static const u8 fips197_ct[16] = {0x69, 0xc4, 0xe0, 0xd8, 0x6a, 0x7b, 0x04, 0x30,
                                  0xd8, 0xcd, 0xb7, 0x80, 0x70, 0xb4, 0xc5, 0x5a};
static const u8 cbc_ct[32] = {0xf2, 0x25, 0x8e, 0x22, 0x5d, 0x79, 0x45, 0x72, 0x39, 0x3a, 0x64,
                              0x84, 0xcf, 0xce, 0xd7, 0xcf, 0x0b, 0x65, 0x10, 0x53, 0xe1, 0x7b,
                              0x1a, 0x71, 0xa0, 0x0a, 0xfb, 0x4d, 0x26, 0x98, 0xdb, 0x79};

static void test_aes(void)
{
    u8 *src = __scratch + 0x4000, *dst = __scratch + 0x5000, *back = __scratch + 0x6000;
    check("aes-status", mmio_read32(AES_BASE + 0x00c) == 0x3f80, "STATUS", mmio_read32(AES_BASE + 0x00c));

    memset_(src, 0, 64);
    memset_(dst, 0xee, 64);
    aes_push(0x11100000u); /* KEY slot 0, built-in key 1, encrypt, ECB */
    aes_data(16, src, dst);
    check("aes-ecb-builtin-key", memeq(dst, zero_block_key1, 16), "first byte", dst[0]);

    aes_push(0x10100000u); /* KEY slot 0, key from payload, 16 bytes, encrypt, ECB */
    aes_push(0x03020100u);
    aes_push(0x07060504u);
    aes_push(0x0b0a0908u);
    aes_push(0x0f0e0d0cu);
    for (int i = 0; i < 16; i++)
        src[i] = (u8)(i * 0x11);
    aes_data(16, src, dst);
    check("aes-fips197", memeq(dst, fips197_ct, 16), "first byte", dst[0]);

    aes_push(0x11110000u); /* built-in key 1, encrypt, CBC */
    aes_push(0x20000000u); /* IV slot 0 = 00..0f */
    aes_push(0x03020100u);
    aes_push(0x07060504u);
    aes_push(0x0b0a0908u);
    aes_push(0x0f0e0d0cu);
    memset_(src, 0, 32);
    aes_data(32, src, dst);
    check("aes-cbc-encrypt", memeq(dst, cbc_ct, 32), "first byte", dst[0]);
    aes_push(0x11010000u); /* same key, decrypt, CBC */
    memset_(back, 0xee, 32);
    aes_data(32, dst, back);
    check("aes-cbc-decrypt", memeq(back, src, 32), "first byte", back[0]);

    gic_enable_spi(INTID_AES);
    mmio_write32(AES_BASE + AES_IRQ_ENABLE, 0x20);
    aes_push(0x880000abu); /* FLAG, raise interrupt, info 0xab */
    int got = wait_for(&aes_irqs, 1, 24000000);
    check("aes-flag-irq", got && aes_irq_status == 0x20, "IRQ_STATUS seen by the handler", aes_irq_status);
    check("aes-flag-info", mmio_read32(AES_BASE + AES_FLAG_INFO) == 0xab, "FLAG_INFO",
          mmio_read32(AES_BASE + AES_FLAG_INFO));
    check("aes-irq-cleared", mmio_read32(AES_BASE + AES_IRQ_STATUS) == 0, "IRQ_STATUS",
          mmio_read32(AES_BASE + AES_IRQ_STATUS));
}

/* ---- PL031 RTC (section 13.2) ---- */
#define RTC_DR   0x000
#define RTC_MR   0x004
#define RTC_IMSC 0x010
#define RTC_ICR  0x01c

static void test_rtc(void)
{
    u32 now = mmio_read32(RTC_BASE + RTC_DR);
    puts("rtc seconds ");
    put_dec(now);
    puts("\n");
    /* 2023-11-14: later than any plausible build of this test. */
    check("rtc-wall-clock", now > 1700000000u, "DR", now);
    check("rtc-id", mmio_read32(RTC_BASE + 0xfe0) == 0x31 && mmio_read32(RTC_BASE + 0xff0) == 0x0d,
          "PeriphID0", mmio_read32(RTC_BASE + 0xfe0));
    gic_enable_spi(INTID_RTC);
    mmio_write32(RTC_BASE + RTC_MR, now + 1);
    mmio_write32(RTC_BASE + RTC_IMSC, 1);
    int got = wait_for(&rtc_irqs, 1, 3 * 24000000UL);
    check("rtc-match-irq", got, "interrupts", rtc_irqs);
    mmio_write32(RTC_BASE + RTC_IMSC, 0);
}

/* ---- pvpanic (section 12) ---- */
static void test_pvpanic(void)
{
    check("pvpanic-events", mmio_read8(PVPANIC_BASE) == 0x03 && mmio_read8(PVPANIC_BASE + 1) == 0x03,
          "events", mmio_read8(PVPANIC_BASE));
    mmio_write8(PVPANIC_BASE, 0x02); /* crash-loaded: reported, the VM runs on */
    puts("pvpanic crash-loaded reported\n");
}

/* ---- PL061 and the power button (section 13.3) ---- */
#define GPIO_DATA_ALL 0x3fc
#define GPIO_IS       0x404
#define GPIO_IBE      0x408
#define GPIO_IEV      0x40c
#define GPIO_IE       0x410
#define GPIO_MIS      0x418
#define GPIO_IC       0x41c
#define POWER_KEY     (1u << 3)

static void test_power_button(void)
{
    gic_enable_spi(INTID_GPIO);
    mmio_write32(GPIO_BASE + GPIO_IS, 0);
    mmio_write32(GPIO_BASE + GPIO_IBE, 0);
    mmio_write32(GPIO_BASE + GPIO_IEV, POWER_KEY);
    mmio_write32(GPIO_BASE + GPIO_IE, POWER_KEY);
    check("gpio-line-low", (mmio_read32(GPIO_BASE + GPIO_DATA_ALL) & POWER_KEY) == 0, "DATA",
          mmio_read32(GPIO_BASE + GPIO_DATA_ALL));
    puts("waiting for the power button\n");
    while (!button_irqs)
        __asm__ volatile("wfi");
    check("power-button-irq", button_mis == POWER_KEY, "GPIOMIS", button_mis);
    check("power-button-high", (button_data_at_irq & POWER_KEY) != 0, "DATA at the interrupt",
          button_data_at_irq);
    /* The pulse lasts 100 ms of virtual time; give it 300. */
    u64 deadline = counter() + 24000000UL * 3 / 10;
    while (counter() < deadline)
        cpu_relax();
    check("power-button-released", (mmio_read32(GPIO_BASE + GPIO_DATA_ALL) & POWER_KEY) == 0, "DATA",
          mmio_read32(GPIO_BASE + GPIO_DATA_ALL));
}

void exception_handler(u64 kind, struct frame *frame)
{
    (void)frame;
    if (kind != EXC_IRQ_SPX) {
        puts("unexpected exception, ESR ");
        put_hex(SYSREG_READ("S3_0_C5_C2_0"));
        puts("\n");
        system_off();
    }
    u64 intid = SYSREG_READ(ICC_IAR1_EL1) & 0xffffff;
    switch (intid) {
    case INTID_AES:
        aes_irq_status = mmio_read32(AES_BASE + AES_IRQ_STATUS);
        mmio_write32(AES_BASE + AES_IRQ_STATUS, (u32)aes_irq_status);
        aes_irqs++;
        break;
    case INTID_RTC:
        mmio_write32(RTC_BASE + RTC_ICR, 1);
        rtc_irqs++;
        break;
    case INTID_GPIO:
        button_mis = mmio_read32(GPIO_BASE + GPIO_MIS);
        button_data_at_irq = mmio_read32(GPIO_BASE + GPIO_DATA_ALL);
        mmio_write32(GPIO_BASE + GPIO_IC, (u32)button_mis);
        button_irqs++;
        break;
    default:
        puts("unexpected interrupt ");
        put_dec(intid);
        puts("\n");
        break;
    }
    SYSREG_WRITE(ICC_EOIR1_EL1, intid);
    isb();
}

void main(void)
{
    puts("apple devices test\n");
    gic_init_distributor();
    gic_init_cpu(0);
    irq_enable();
    test_cfg();
    test_bdif();
    test_aes();
    test_rtc();
    test_pvpanic();
    test_power_button();
    if (failures() == 0)
        puts("ALL CHECKS PASSED\n");
    else
        puts("SOME CHECKS FAILED\n");
    system_off();
}

void secondary_main(u64 context)
{
    (void)context;
}
