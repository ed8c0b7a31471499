/*
 * ferry-guest: a tiny multiboot kernel that fills guest RAM with verifiable,
 * incompressible data, keeps dirtying it at a fixed rate and reports on the
 * serial port. It exists to exercise live migration: a page that arrives
 * corrupt or stale on the destination is detected and reported.
 *
 * Freestanding: no libc, no libgcc (hence no 64-bit division anywhere), no
 * interrupts, no paging. Memory layout (physical == virtual):
 *
 *   1 MiB        the image itself, its 16 KiB stack, then QEMU's multiboot info
 *   GEN_TABLE    one u32 generation per filled page (2 MiB .. 3.75 MiB)
 *   REPORTED     bitmap of pages already reported CORRUPT (3.75 MiB ..)
 *   FILL_BASE    fill_mib MiB of pages (4 MiB ..), then one marker page
 *
 * Page p (1024 words): w[0] = p ^ PAGE_MAGIC, w[1] = gen, w[2] = mix(p, gen),
 * w[3..1024] = xorshift32 stream seeded by seed_of(p). The generation also
 * lives in GEN_TABLE, so a page that migration left at an older (but
 * self-consistent) generation still disagrees with the table.
 *
 * Keep the layout constants in sync with the README.
 */

#include "guest.h"

#define MB_BOOT_MAGIC 0x2BADB002u
#define MB_INFO_MEM (1u << 0)
#define MB_INFO_CMDLINE (1u << 2)

#define PAGE_SIZE 4096u
#define PAGE_WORDS 1024u
#define PAGE_MAGIC 0xFE44A5E7u
#define GEN_TABLE ((u32 *)0x200000)
#define REPORTED ((u32 *)0x3C0000)
#define FILL_BASE 0x400000u
/* The generation table must end where the bitmap starts. */
#define MAX_PAGES ((0x3C0000u - 0x200000u) / 4u)
#define MAX_FILL_MIB (MAX_PAGES / 256u)

#define MARKER_MAX 64u
#define CMDLINE_MAX 512u
/* Word flipped by corrupt_after_ms: beyond the header words, so only the
 * full-page sweep can find it (the dirtier checks words 0..2). */
#define CORRUPT_WORD 100u

static void halt(void)
{
    for (;;)
        __asm__ volatile("cli; hlt");
}

/* ---- page contents -------------------------------------------------------- */

static inline u32 fmix32(u32 h)
{
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    h ^= h >> 16;
    return h;
}

static inline u32 seed_of(u32 p)
{
    u32 s = fmix32(p ^ 0x9E3779B9u);
    return s ? s : 0x6A09E667u; /* xorshift would stay 0 forever */
}

static inline u32 mix(u32 p, u32 gen)
{
    return fmix32(p * 0x9E3779B1u + fmix32(gen ^ 0x85EBCA77u));
}

static inline u32 xorshift32(u32 x)
{
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return x;
}

static inline u32 *page_ptr(u32 p)
{
    return (u32 *)(FILL_BASE + p * PAGE_SIZE);
}

static void fill_page(u32 p)
{
    u32 *w = page_ptr(p);
    u32 x = seed_of(p);
    w[0] = p ^ PAGE_MAGIC;
    w[1] = 0;
    w[2] = mix(p, 0);
    for (u32 i = 3; i < PAGE_WORDS; i++) {
        x = xorshift32(x);
        w[i] = x;
    }
    GEN_TABLE[p] = 0;
}

static inline int header_ok(u32 p, const u32 *w)
{
    u32 gen = GEN_TABLE[p];
    return w[0] == (p ^ PAGE_MAGIC) && w[1] == gen && w[2] == mix(p, gen);
}

static int page_ok(u32 p)
{
    const u32 *w = page_ptr(p);
    if (!header_ok(p, w))
        return 0;
    u32 x = seed_of(p), diff = 0;
    for (u32 i = 3; i < PAGE_WORDS; i++) {
        x = xorshift32(x);
        diff |= w[i] ^ x; /* no early exit: keeps the loop branch-free */
    }
    return diff == 0;
}

/* Print CORRUPT once per page, whichever checker finds it first, so a bad
 * page does not flood the serial line on every pass. */
static void report_corrupt(u32 p)
{
    u32 bit = 1u << (p & 31);
    if (REPORTED[p >> 5] & bit)
        return;
    REPORTED[p >> 5] |= bit;
    puts("CORRUPT page=");
    put_u32(p);
    putc('\n');
}

/* ---- command line --------------------------------------------------------- */

struct params {
    u32 fill_mib, dirty, hb_ms;
    u32 corrupt_after_ms; /* 0: never */
    u32 tlbflush;         /* 1: invlpg before each dirtying write (see README) */
    char marker[MARKER_MAX + 1];
    u32 marker_len;
    char tpm[TPM_MARKER_MAX + 1]; /* tpm=MARKER: use the vTPM (tpm.c) */
    u32 tpm_len;
    u32 tpm_ms; /* read PCR 16 and the counter again this often */
};

static char cmdline[CMDLINE_MAX + 1];

static void fail(const char *what, const char *detail)
{
    puts("ERROR ");
    puts(what);
    puts(detail);
    putc('\n');
    halt();
}

static int key_is(const char *tok, u32 klen, const char *key)
{
    u32 i = 0;
    for (; i < klen && key[i]; i++)
        if (tok[i] != key[i])
            return 0;
    return i == klen && key[i] == 0;
}

static u32 parse_u32(const char *tok, const char *s, u32 len)
{
    u64 v = 0;
    if (len == 0 || len > 10)
        fail("bad number in ", tok);
    for (u32 i = 0; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            fail("bad number in ", tok);
        v = v * 10 + (u32)(s[i] - '0');
    }
    if (v > 0xFFFFFFFFull)
        fail("number too large in ", tok);
    return (u32)v;
}

/* Tokens are space separated key=value pairs. Tokens without '=' are
 * skipped: QEMU puts the kernel's file name first on the command line. */
static inline void invlpg(const volatile void *addr)
{
    __asm__ volatile("invlpg (%0)" : : "r"(addr) : "memory");
}

static void parse_cmdline(struct params *pr)
{
    char *s = cmdline;
    while (*s) {
        while (*s == ' ')
            s++;
        char *tok = s;
        while (*s && *s != ' ')
            s++;
        if (*s)
            *s++ = 0; /* terminate the token so messages can quote it */
        u32 klen = 0;
        while (tok[klen] && tok[klen] != '=')
            klen++;
        if (!tok[klen])
            continue;
        const char *val = tok + klen + 1;
        u32 vlen = 0;
        while (val[vlen])
            vlen++;
        if (key_is(tok, klen, "fill_mib"))
            pr->fill_mib = parse_u32(tok, val, vlen);
        else if (key_is(tok, klen, "dirty"))
            pr->dirty = parse_u32(tok, val, vlen);
        else if (key_is(tok, klen, "hb_ms"))
            pr->hb_ms = parse_u32(tok, val, vlen);
        else if (key_is(tok, klen, "tlbflush"))
            pr->tlbflush = parse_u32(tok, val, vlen);
        else if (key_is(tok, klen, "corrupt_after_ms"))
            pr->corrupt_after_ms = parse_u32(tok, val, vlen);
        else if (key_is(tok, klen, "tpm_ms"))
            pr->tpm_ms = parse_u32(tok, val, vlen);
        else if (key_is(tok, klen, "tpm")) {
            if (vlen == 0 || vlen > TPM_MARKER_MAX)
                fail("tpm marker must be 1..32 bytes: ", tok);
            for (u32 i = 0; i < vlen; i++)
                pr->tpm[i] = val[i];
            pr->tpm_len = vlen;
        } else if (key_is(tok, klen, "marker")) {
            if (vlen == 0 || vlen > MARKER_MAX)
                fail("marker must be 1..64 bytes: ", tok);
            for (u32 i = 0; i < vlen; i++)
                pr->marker[i] = val[i];
            pr->marker[vlen] = 0;
            pr->marker_len = vlen;
        } else {
            /* A typo should be visible, but need not stop the guest. */
            puts("WARN unknown option ");
            puts(tok);
            putc('\n');
        }
    }
}

/* ---- main ----------------------------------------------------------------- */

struct mb_info {
    u32 flags, mem_lower, mem_upper, boot_device, cmdline;
};

static void write_marker(const struct params *pr, u32 pages)
{
    char *m = (char *)page_ptr(pages);
    for (u32 i = 0; i < PAGE_SIZE; i++)
        m[i] = pr->marker[i % pr->marker_len];
}

void kmain(u32 magic, const struct mb_info *mbi)
{
    struct params pr = {.fill_mib = 64, .dirty = 64, .hb_ms = 10, .tpm_ms = 1000};

    serial_init();
    if (magic != MB_BOOT_MAGIC)
        fail("not booted by a multiboot loader", "");
    if (!(mbi->flags & MB_INFO_MEM))
        fail("multiboot info has no memory size", "");
    /* Copy the command line before anything could overwrite the info. */
    cmdline[0] = 0;
    if (mbi->flags & MB_INFO_CMDLINE) {
        const char *src = (const char *)mbi->cmdline;
        u32 i = 0;
        for (; i < CMDLINE_MAX && src[i]; i++)
            cmdline[i] = src[i];
        cmdline[i] = 0;
    }
    parse_cmdline(&pr);

    /* mem_upper: KiB of contiguous RAM from 1 MiB. Compare in KiB, all
     * u32: the fill plus one marker page must end below the top of RAM. */
    u32 ram_top_kib = 1024 + mbi->mem_upper;
    if (pr.fill_mib == 0 || pr.fill_mib > MAX_FILL_MIB)
        fail("fill_mib must be 1..1792", "");
    if (FILL_BASE / 1024 + pr.fill_mib * 1024 + PAGE_SIZE / 1024 > ram_top_kib) {
        puts("ERROR fill_mib=");
        put_u32(pr.fill_mib);
        puts(" exceeds RAM ram_mib=");
        put_u32(ram_top_kib / 1024);
        putc('\n');
        halt();
    }
    if (pr.hb_ms == 0)
        fail("hb_ms must be at least 1", "");

    u32 pages = pr.fill_mib * 256;
    for (u32 i = 0; i < (pages + 31) / 32; i++)
        REPORTED[i] = 0;
    for (u32 p = 0; p < pages; p++)
        fill_page(p);
    if (pr.marker_len)
        write_marker(&pr, pages);

    int tpm = pr.tpm_len && tpm_boot(pr.tpm, pr.tpm_len);

    puts("READY fill_mib=");
    put_u32(pr.fill_mib);
    puts(" pages=");
    put_u32(pages);
    putc('\n');

    u32 dirty_ptr = 0, sweep_ptr = 0, sweep_errors = 0;
    u64 dirtied = 0, hb_seq = 0, pass = 1;
    int corrupt_pending = pr.corrupt_after_ms != 0;

    clock_init();
    u32 last = clock_ms();
    u32 next_hb = last + pr.hb_ms;
    u32 next_tpm = last + pr.tpm_ms;
    for (;;) {
        u32 now = clock_ms();
        int tick = now != last;
        last = now;

        if (tick && pr.tlbflush) {
            /* The image's own pages (counters, stack) are written all the
             * time; re-arm QEMU's dirty tracking for them once per tick. */
            extern char __image_end[];
            for (u32 a = 0x100000; a < (u32)__image_end; a += 4096)
                invlpg((const void *)a);
        }
        if (tick) {
            /* One tick's worth of dirtying however many ms passed: after an
             * overrun we skip ahead rather than catch up. */
            for (u32 k = 0; k < pr.dirty; k++) {
                u32 p = dirty_ptr;
                u32 *w = page_ptr(p);
                if (!header_ok(p, w))
                    report_corrupt(p);
                if (pr.tlbflush) {
                    /* Drop the TLB entries first so the writes below take
                     * QEMU's slow path, which records them for migration. */
                    invlpg(w);
                    invlpg(&GEN_TABLE[p]);
                }
                u32 gen = GEN_TABLE[p] + 1;
                GEN_TABLE[p] = gen;
                w[1] = gen;
                w[2] = mix(p, gen);
                dirty_ptr = p + 1 == pages ? 0 : p + 1;
            }
            dirtied += pr.dirty;
        }

        /* Between ticks the sweep soaks up the idle time; on a tick it runs
         * once, so it progresses even when dirtying fills the whole ms. */
        if (!page_ok(sweep_ptr)) {
            sweep_errors++;
            report_corrupt(sweep_ptr);
        }
        if (++sweep_ptr == pages) {
            puts("SWEEP pass=");
            put_u64(pass);
            puts(" pages=");
            put_u32(pages);
            puts(" errors=");
            put_u32(sweep_errors);
            putc('\n');
            pass++;
            sweep_ptr = 0;
            sweep_errors = 0;
        }

        if (!tick)
            continue;
        if (corrupt_pending && (int)(now - pr.corrupt_after_ms) >= 0) {
            u32 p = pages / 2;
            page_ptr(p)[CORRUPT_WORD] ^= 0x00010000u;
            corrupt_pending = 0;
            puts("INJECT page=");
            put_u32(p);
            puts(" word=");
            put_u32(CORRUPT_WORD);
            putc('\n');
        }
        if (tpm && pr.tpm_ms && (int)(now - next_tpm) >= 0) {
            tpm_report();
            next_tpm = clock_ms() + pr.tpm_ms;
        }
        if ((int)(now - next_hb) >= 0) {
            puts("HB seq=");
            put_u64(hb_seq++);
            puts(" dirtied=");
            put_u64(dirtied);
            putc('\n');
            next_hb += pr.hb_ms;
            if ((int)(now - next_hb) >= 0) /* overran: no burst of HBs */
                next_hb = now + pr.hb_ms;
        }
    }
}
