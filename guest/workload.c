/* qtm-workload: a tiny multiboot guest that dirties a chosen working set of RAM at a chosen rate,
 * so migrations can be measured against a known, reproducible load (see src/vm/workload.rs).
 *
 * Command line (QEMU's -append, passed in the multiboot information structure):
 *   wss=MIB    working set in MiB, from 4 MiB upwards in guest-physical RAM (default 64);
 *              0: idle (the CPU halts between timer ticks and dirties nothing of note)
 *   rate=N     pages dirtied per second (default 0: as fast as the CPU can)
 *
 * What it does:
 * 1. Sets up the 8259 PIC and PIT channel 0 at 1000 Hz, and calibrates the TSC against it.
 * 2. Writes a non-zero word into every page of the working set (so each page is a "normal" page
 *    for migration, not a zero page), unpaced.
 * 3. Forever: walks the working set writing one 32-bit word per page (the pass number), paced to
 *    `rate` pages per second by TSC-measured credit; when it is ahead it halts until the next
 *    timer tick, so an idle or slow workload costs the host little CPU.
 *
 * Progress, so a test can see it run:
 * - COM1 (0x3f8) lines: "qtm-workload: start ...", "qtm-workload: filled ...", and about every
 *   500 ms "qtm-workload: pass N pages P rate R" (N passes completed, P pages dirtied in total,
 *   R pages per second since the previous line);
 * - a status block at guest-physical 0x8000 (see `struct status`), readable from the RAM file. */

typedef unsigned int u32;
typedef unsigned long long u64;

#define MULTIBOOT_BOOTLOADER_MAGIC 0x2BADB002u
#define MBI_FLAG_MEM (1u << 0)
#define MBI_FLAG_CMDLINE (1u << 2)

#define PAGE 4096u
#define WS_START (4u << 20)
#define STATUS_ADDR 0x8000u
#define STATUS_MAGIC 0x574D5451u /* "QTMW" */
#define TICK_HZ 1000u
#define PIT_HZ 1193182u
#define REPORT_TICKS 500u
#define CALIBRATE_TICKS 200u
#define COM1 0x3F8

struct multiboot_info {
    u32 flags;
    u32 mem_lower;
    u32 mem_upper;
    u32 boot_device;
    u32 cmdline;
};

/* At STATUS_ADDR; every field little-endian u32. */
struct status {
    u32 magic;
    u32 version;
    u32 passes;      /* completed passes over the working set */
    u32 pages_lo;    /* pages dirtied since the fill, low and high halves */
    u32 pages_hi;
    u32 ws_pages;    /* working set, in pages */
    u32 rate;        /* requested pages per second (0: unpaced) */
    u32 tsc_hz16;    /* TSC ticks per second, divided by 16 */
    u32 ticks;       /* timer ticks (1 ms) since start */
    u32 filled;      /* 1 once the fill is done */
};

static volatile u32 ticks;

static inline void outb(unsigned short port, unsigned char v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline unsigned char inb(unsigned short port)
{
    unsigned char v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

/* The TSC divided by 16, low 32 bits: wraps after minutes, enough for differences. */
static inline u32 tsc16(void)
{
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return (lo >> 4) | (hi << 28);
}

/* (a * b + c) / d and the remainder, with a 64-bit intermediate; the quotient must fit 32 bits.
 * (Written with divl: a freestanding 32-bit build has no libgcc for 64-bit division.) */
static inline u32 muladddiv(u32 a, u32 b, u32 c, u32 d, u32 *rem)
{
    u32 lo, hi, q, r;
    __asm__("mull %3" : "=a"(lo), "=d"(hi) : "a"(a), "rm"(b));
    __asm__("addl %2, %0\n\tadcl $0, %1" : "+r"(lo), "+r"(hi) : "rm"(c));
    __asm__("divl %4" : "=a"(q), "=d"(r) : "a"(lo), "d"(hi), "rm"(d));
    if (rem)
        *rem = r;
    return q;
}

static void putc_serial(char c)
{
    while (!(inb(COM1 + 5) & 0x20))
        ;
    outb(COM1, (unsigned char)c);
}

static void puts_serial(const char *s)
{
    while (*s)
        putc_serial(*s++);
}

static void putu(u32 v)
{
    char buf[11];
    int i = 10;
    buf[i] = 0;
    do {
        buf[--i] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    puts_serial(&buf[i]);
}

/* A 64-bit count, printed without 64-bit division: one divl by 10^9, which is enough for any
 * count below 10^9 * 2^32. */
static void putu64(u64 v)
{
    u32 hi = (u32)(v >> 32), lo = (u32)v;
    if (!hi) {
        putu(lo);
        return;
    }
    u32 top, low;
    __asm__("divl %4" : "=a"(top), "=d"(low) : "a"(lo), "d"(hi), "rm"(1000000000u));
    putu(top);
    char buf[10];
    for (int i = 8; i >= 0; i--) {
        buf[i] = (char)('0' + low % 10);
        low /= 10;
    }
    buf[9] = 0;
    puts_serial(buf);
}

static void serial_init(void)
{
    outb(COM1 + 1, 0x00); /* no interrupts */
    outb(COM1 + 3, 0x80); /* DLAB */
    outb(COM1 + 0, 0x01); /* 115200 baud */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); /* 8N1 */
    outb(COM1 + 2, 0xC7); /* FIFO on */
}

/* The 8259s remapped to vectors 32-47, everything masked but IRQ0 (the PIT). */
static void pic_init(void)
{
    outb(0x20, 0x11);
    outb(0xA0, 0x11);
    outb(0x21, 32);
    outb(0xA1, 40);
    outb(0x21, 0x04);
    outb(0xA1, 0x02);
    outb(0x21, 0x01);
    outb(0xA1, 0x01);
    outb(0x21, 0xFE);
    outb(0xA1, 0xFF);
}

/* PIT channel 0, mode 2 (rate generator), at TICK_HZ. */
static void pit_init(void)
{
    u32 divisor = (PIT_HZ + TICK_HZ / 2) / TICK_HZ;
    outb(0x43, 0x34);
    outb(0x40, (unsigned char)divisor);
    outb(0x40, (unsigned char)(divisor >> 8));
}

/* Called by the stubs in start.S with the vector number. */
void interrupt(u32 vector)
{
    if (vector < 32) {
        puts_serial("qtm-workload: CPU exception ");
        putu(vector);
        puts_serial(", halting\n");
        for (;;)
            __asm__ volatile("cli; hlt");
    }
    if (vector == 32)
        ticks++;
    if (vector >= 40)
        outb(0xA0, 0x20);
    outb(0x20, 0x20);
}

static inline void halt_until_interrupt(void)
{
    __asm__ volatile("sti; hlt" ::: "memory");
}

/* The value of `key=` in the command line, or `dflt`. */
static u32 arg_u32(const char *cmdline, const char *key, u32 dflt)
{
    if (!cmdline)
        return dflt;
    for (const char *p = cmdline; *p; p++) {
        if (p != cmdline && p[-1] != ' ')
            continue;
        const char *k = key, *q = p;
        while (*k && *q == *k) {
            k++;
            q++;
        }
        if (*k || *q != '=')
            continue;
        q++;
        if (*q < '0' || *q > '9')
            return dflt;
        u32 v = 0;
        while (*q >= '0' && *q <= '9') {
            u32 next = v * 10 + (u32)(*q - '0');
            v = next < v ? 0xFFFFFFFFu : next;
            q++;
        }
        return v;
    }
    return dflt;
}

static void report(struct status *st, u64 pages, u32 rate)
{
    puts_serial("qtm-workload: pass ");
    putu(st->passes);
    puts_serial(" pages ");
    putu64(pages);
    puts_serial(" rate ");
    putu(rate);
    puts_serial("\n");
}

void workload_main(u32 magic, const struct multiboot_info *mbi)
{
    serial_init();
    const char *cmdline = 0;
    u32 ram_end = 0;
    if (magic == MULTIBOOT_BOOTLOADER_MAGIC) {
        if (mbi->flags & MBI_FLAG_CMDLINE)
            cmdline = (const char *)mbi->cmdline;
        if (mbi->flags & MBI_FLAG_MEM)
            ram_end = (1u << 20) + mbi->mem_upper * 1024u;
    } else {
        puts_serial("qtm-workload: not started by a multiboot loader; using defaults\n");
    }
    u32 wss_mib = arg_u32(cmdline, "wss", 64);
    u32 rate = arg_u32(cmdline, "rate", 0);

    /* Keep a MiB clear below the top of RAM: firmware tables live there. */
    u32 usable = ram_end > WS_START + (1u << 20) ? ram_end - WS_START - (1u << 20) : 0;
    u32 ws_pages = wss_mib > 4095 ? 0xFFFFFFFFu : wss_mib * 256u;
    if (ws_pages > usable / PAGE) {
        puts_serial("qtm-workload: working set capped to the RAM there is\n");
        ws_pages = usable / PAGE;
    }

    struct status *st = (struct status *)STATUS_ADDR;
    st->magic = 0;
    st->version = 1;
    st->passes = 0;
    st->pages_lo = 0;
    st->pages_hi = 0;
    st->ws_pages = ws_pages;
    st->rate = rate;
    st->filled = 0;

    pic_init();
    pit_init();
    __asm__ volatile("sti");

    /* Calibrate the TSC against CALIBRATE_TICKS timer ticks. */
    u32 t = ticks;
    while (ticks == t)
        halt_until_interrupt();
    u32 start_ticks = ticks, start_tsc = tsc16();
    while (ticks - start_ticks < CALIBRATE_TICKS)
        halt_until_interrupt();
    u32 hz16 = muladddiv(tsc16() - start_tsc, TICK_HZ, 0, ticks - start_ticks, 0);
    if (hz16 == 0)
        hz16 = 1;
    st->tsc_hz16 = hz16;
    st->magic = STATUS_MAGIC;

    puts_serial("qtm-workload: start wss_mib=");
    putu(ws_pages / 256);
    puts_serial(" rate=");
    putu(rate);
    puts_serial(" pages=");
    putu(ws_pages);
    puts_serial(" tsc_mhz=");
    putu(muladddiv(hz16, 16, 0, 1000000, 0));
    puts_serial("\n");

    if (ws_pages == 0) {
        puts_serial("qtm-workload: idle\n");
        u32 last = ticks;
        for (;;) {
            halt_until_interrupt();
            st->ticks = ticks;
            if (ticks - last >= 10 * TICK_HZ) {
                last = ticks;
                puts_serial("qtm-workload: idle ticks ");
                putu(ticks);
                puts_serial("\n");
            }
        }
    }

    /* The fill: one non-zero word in every page, so that no page of the working set is a zero
     * page, which migration sends as a flag instead of 4 KiB. (What else a page holds makes no
     * difference: QEMU compresses nothing unless asked.) */
    u32 fill_start = tsc16();
    for (u32 i = 0; i < ws_pages; i++)
        *(volatile u32 *)(WS_START + i * PAGE) = (i * 2654435761u) | 1u;
    st->filled = 1;
    puts_serial("qtm-workload: filled ");
    putu(ws_pages);
    puts_serial(" pages in ");
    putu(muladddiv(tsc16() - fill_start, 1000, 0, hz16, 0));
    puts_serial(" ms\n");

    u64 pages = 0, last_pages = 0;
    u32 credit = 0, credit_rem = 0, last_tsc = tsc16();
    u32 report_tsc = last_tsc, report_ticks = ticks;
    u32 max_credit = rate / 10 + 1; /* at most 100 ms of catching up after a pause */
    u32 pass = 0;
    for (;;) {
        pass++;
        for (u32 i = 0; i < ws_pages; i++) {
            if (rate) {
                while (credit == 0) {
                    u32 now = tsc16();
                    u32 delta = now - last_tsc;
                    last_tsc = now;
                    if (delta > hz16)
                        delta = hz16;
                    credit += muladddiv(delta, rate, credit_rem, hz16, &credit_rem);
                    if (credit > max_credit)
                        credit = max_credit;
                    if (credit == 0)
                        halt_until_interrupt();
                }
                credit--;
            }
            volatile u32 *word = (volatile u32 *)(WS_START + i * PAGE + ((pass * 64) & (PAGE - 1)));
            *word = pass;
            pages++;
            if ((i & 255) == 0 && ticks - report_ticks >= REPORT_TICKS) {
                u32 now = tsc16();
                u32 r = muladddiv((u32)(pages - last_pages), hz16, 0, now - report_tsc ? now - report_tsc : 1, 0);
                st->pages_lo = (u32)pages;
                st->pages_hi = (u32)(pages >> 32);
                st->ticks = ticks;
                report(st, pages, r);
                report_tsc = now;
                report_ticks = ticks;
                last_pages = pages;
            }
        }
        st->passes = pass;
        st->pages_lo = (u32)pages;
        st->pages_hi = (u32)(pages >> 32);
    }
}
