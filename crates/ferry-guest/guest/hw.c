/*
 * The guest's hardware: the serial console (COM1, polled) and the clock
 * (PIT channel 0, polled). guest.c and tpm.c both use them (guest.h).
 */

#include "guest.h"

#define COM1 0x3F8
#define PIT_CH0 0x40
#define PIT_CMD 0x43
#define PIT_HZ 1193182u

/* ---- port I/O and serial ------------------------------------------------ */

static inline void outb(u16 port, u8 v)
{
    __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port));
}

static inline u8 inb(u16 port)
{
    u8 v;
    __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
    return v;
}

void serial_init(void)
{
    outb(COM1 + 1, 0x00); /* no UART interrupts: we poll */
    outb(COM1 + 3, 0x80); /* DLAB on to set the divisor */
    outb(COM1 + 0, 0x01); /* divisor 1 = 115200 baud */
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03); /* 8N1, DLAB off */
    outb(COM1 + 2, 0xC7); /* FIFOs on and cleared */
    outb(COM1 + 4, 0x03); /* DTR + RTS */
}

void putc(char c)
{
    while (!(inb(COM1 + 5) & 0x20)) /* LSR.THRE: transmitter ready */
        ;
    outb(COM1, (u8)c);
}

void puts(const char *s)
{
    while (*s)
        putc(*s++);
}

/* u64 / 10 in 16-bit steps, because gcc would call libgcc's __udivdi3. */
static u64 div10(u64 v, u32 *rem)
{
    u32 hi = (u32)(v >> 32), lo = (u32)v;
    u32 qhi = hi / 10, r = hi % 10;
    u32 cur = (r << 16) | (lo >> 16);
    u32 q1 = cur / 10;
    cur = ((cur % 10) << 16) | (lo & 0xFFFF);
    u32 q0 = cur / 10;
    *rem = cur % 10;
    return ((u64)qhi << 32) | (q1 << 16) | q0;
}

void put_u64(u64 v)
{
    char buf[20];
    int n = 0;
    do {
        u32 r;
        v = div10(v, &r);
        buf[n++] = (char)('0' + r);
    } while (v);
    while (n)
        putc(buf[--n]);
}

void put_u32(u32 v) { put_u64(v); }

/* ---- time: PIT channel 0, polled ------------------------------------------
 * Channel 0 free-runs in mode 2 over the full 16-bit range (one wrap per
 * 54.9 ms). Each poll converts the ticks elapsed since the previous poll into
 * milliseconds, so time stays exact as long as we poll at least every 54 ms,
 * however long the work between polls took: no interrupts, and no lost
 * milliseconds when a tick's work overruns. Under QEMU the count follows the
 * virtual clock, which stops while the VM is paused.
 */

static u32 pit_last;
static u32 pit_frac; /* elapsed PIT ticks * 1000 not yet worth a millisecond */
static u32 now_ms;

static u32 pit_read(void)
{
    outb(PIT_CMD, 0x00); /* latch channel 0 */
    u32 lo = inb(PIT_CH0);
    u32 hi = inb(PIT_CH0);
    return lo | (hi << 8);
}

void clock_init(void)
{
    outb(PIT_CMD, 0x34); /* channel 0, lobyte/hibyte, mode 2, binary */
    outb(PIT_CH0, 0);    /* reload 0 means 65536 */
    outb(PIT_CH0, 0);
    pit_last = pit_read();
    pit_frac = 0;
    now_ms = 0;
}

u32 clock_ms(void)
{
    u32 cur = pit_read();
    u32 delta = (pit_last - cur) & 0xFFFF; /* the counter counts down */
    pit_last = cur;
    pit_frac += delta * 1000; /* < 2^32: delta < 65536, frac < PIT_HZ */
    if (pit_frac >= PIT_HZ) {
        now_ms += pit_frac / PIT_HZ;
        pit_frac %= PIT_HZ;
    }
    return now_ms;
}
