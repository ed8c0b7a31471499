/*
 * A minimal TPM 2.0 driver for QEMU's tpm-crb device (TCG PC Client
 * Platform TPM Profile, CRB interface), locality 0 only, polled: enough for
 * the guest to prove that its vTPM's state survives a live migration.
 *
 * Each command: request locality 0, set cmdReady, write the command into
 * the data buffer, set START, poll until the TPM clears it, read the
 * response from the same buffer. All TPM fields are big-endian.
 *
 * Output (one line each):
 *   TPM pcr16=<64 hex digits> nv=<counter>
 *   TPM ERROR <step> rc=<hex>          (rc 0xffffffff: no answer)
 */

#include "guest.h"

#define CRB_BASE 0xFED40000u
#define CRB_LOC_CTRL 0x08u
#define CRB_LOC_STS 0x0Cu
#define CRB_INTF_ID 0x30u
#define CRB_CTRL_REQ 0x40u
#define CRB_CTRL_STS 0x44u
#define CRB_CTRL_START 0x4Cu
#define CRB_DATA 0x80u
#define CRB_DATA_SIZE 0xF80u

#define NO_ANSWER 0xFFFFFFFFu
/* Guest-time budget of one command; swtpm answers in well under 1 s. */
#define CMD_TIMEOUT_MS 5000u

/* TPM 2.0 constants (TPM 2.0 Part 2). */
#define ST_NO_SESSIONS 0x8001u
#define ST_SESSIONS 0x8002u
#define CC_NV_DEFINE 0x12Au
#define CC_NV_INCREMENT 0x134u
#define CC_STARTUP 0x144u
#define CC_NV_READ 0x14Eu
#define CC_PCR_READ 0x17Eu
#define CC_PCR_EXTEND 0x182u
#define RC_INITIALIZE 0x100u /* already started (by the firmware) */
#define RC_NV_DEFINED 0x14Cu /* the counter exists: defined once */
#define RS_PW 0x40000009u
#define RH_OWNER 0x40000001u
#define ALG_SHA256 0x000Bu
#define PCR 16u
/* An owner-range NV index, a counter readable and writable with its own
 * (empty) auth, never counted by dictionary-attack protection. */
#define NV_INDEX 0x01500016u
#define NV_ATTRS (0x10u /* NT_COUNTER */ | 0x4u /* AUTHWRITE */ | 0x40000u /* AUTHREAD */ \
                  | 0x2000000u /* NO_DA */)

static volatile u32 *reg(u32 off)
{
    return (volatile u32 *)(CRB_BASE + off);
}

/* ---- building a command -------------------------------------------------- */

static u8 buf[256];
static u32 len;

static void be16(u32 v)
{
    buf[len++] = (u8)(v >> 8);
    buf[len++] = (u8)v;
}

static void be32(u32 v)
{
    be16(v >> 16);
    be16(v & 0xFFFF);
}

static u32 get32(const u8 *p)
{
    return ((u32)p[0] << 24) | ((u32)p[1] << 16) | ((u32)p[2] << 8) | p[3];
}

static void begin(u32 tag, u32 cc)
{
    len = 0;
    be16(tag);
    be32(0); /* size, set by send() */
    be32(cc);
}

/* An empty password session: every auth value here is empty. */
static void password_session(void)
{
    be32(9); /* authorizationSize */
    be32(RS_PW);
    be16(0); /* nonce */
    buf[len++] = 0; /* sessionAttributes */
    be16(0); /* hmac */
}

/* Run the command in buf; the response lands in buf (up to its size).
 * Returns the response code, or NO_ANSWER. */
static u32 send(void)
{
    volatile u8 *data = (volatile u8 *)(CRB_BASE + CRB_DATA);
    buf[2] = (u8)(len >> 24);
    buf[3] = (u8)(len >> 16);
    buf[4] = (u8)(len >> 8);
    buf[5] = (u8)len;
    *reg(CRB_LOC_CTRL) = 1; /* requestAccess, locality 0 */
    u32 start = clock_ms();
    while (!(*reg(CRB_LOC_STS) & 1))
        if (clock_ms() - start > CMD_TIMEOUT_MS)
            return NO_ANSWER;
    *reg(CRB_CTRL_REQ) = 1; /* cmdReady */
    while (*reg(CRB_CTRL_REQ) & 1)
        if (clock_ms() - start > CMD_TIMEOUT_MS)
            return NO_ANSWER;
    for (u32 i = 0; i < len; i++)
        data[i] = buf[i];
    *reg(CRB_CTRL_START) = 1;
    while (*reg(CRB_CTRL_START) & 1)
        if (clock_ms() - start > CMD_TIMEOUT_MS)
            return NO_ANSWER;
    if (*reg(CRB_CTRL_STS) & 1) /* tpmSts: fatal error */
        return NO_ANSWER;
    for (u32 i = 0; i < 10; i++)
        buf[i] = data[i];
    u32 size = get32(buf + 2);
    if (size < 10 || size > sizeof buf)
        return NO_ANSWER;
    for (u32 i = 10; i < size; i++)
        buf[i] = data[i];
    return get32(buf + 6);
}

static void error(const char *step, u32 rc)
{
    static const char hex[] = "0123456789abcdef";
    puts("TPM ERROR ");
    puts(step);
    puts(" rc=0x");
    for (int s = 28; s >= 0; s -= 4)
        putc(hex[(rc >> s) & 0xF]);
    putc('\n');
}

/* ---- the commands -------------------------------------------------------- */

static u32 startup(void)
{
    begin(ST_NO_SESSIONS, CC_STARTUP);
    be16(0); /* SU_CLEAR */
    u32 rc = send();
    return rc == RC_INITIALIZE ? 0 : rc;
}

static u32 pcr_extend(const char *marker, u32 n)
{
    begin(ST_SESSIONS, CC_PCR_EXTEND);
    be32(PCR);
    password_session();
    be32(1); /* one digest */
    be16(ALG_SHA256);
    for (u32 i = 0; i < 32; i++) /* the marker, zero-padded, is the digest */
        buf[len++] = i < n ? (u8)marker[i] : 0;
    return send();
}

static u32 nv_define(void)
{
    begin(ST_SESSIONS, CC_NV_DEFINE);
    be32(RH_OWNER);
    password_session();
    be16(0); /* auth of the index: empty */
    be16(14); /* TPMS_NV_PUBLIC */
    be32(NV_INDEX);
    be16(ALG_SHA256);
    be32(NV_ATTRS);
    be16(0); /* no policy */
    be16(8); /* a counter is 8 bytes */
    u32 rc = send();
    return rc == RC_NV_DEFINED ? 0 : rc;
}

static u32 nv_increment(void)
{
    begin(ST_SESSIONS, CC_NV_INCREMENT);
    be32(NV_INDEX); /* authHandle: the index itself */
    be32(NV_INDEX);
    password_session();
    return send();
}

/* PCR 16 of the SHA-256 bank into out[32]. */
static u32 pcr_read(u8 *out)
{
    begin(ST_NO_SESSIONS, CC_PCR_READ);
    be32(1);
    be16(ALG_SHA256);
    buf[len++] = 3;
    buf[len++] = 0;
    buf[len++] = 0;
    buf[len++] = 1; /* PCR 16 */
    u32 rc = send();
    if (rc)
        return rc;
    /* header, updateCounter, the selection out (count, then alg, size,
     * bitmap each), then the digests (count, size, bytes). */
    u32 at = 14, n = get32(buf + at);
    at += 4;
    for (u32 i = 0; i < n && at < sizeof buf - 3; i++)
        at += 3 + buf[at + 2];
    if (at + 38 > sizeof buf || get32(buf + at) != 1 || buf[at + 4] != 0 || buf[at + 5] != 32)
        return NO_ANSWER;
    for (u32 i = 0; i < 32; i++)
        out[i] = buf[at + 6 + i];
    return 0;
}

static u32 nv_read(u64 *value)
{
    begin(ST_SESSIONS, CC_NV_READ);
    be32(NV_INDEX);
    be32(NV_INDEX);
    password_session();
    be16(8); /* size */
    be16(0); /* offset */
    u32 rc = send();
    if (rc)
        return rc;
    /* header, parameterSize, then TPM2B: size, bytes. */
    if (buf[14] != 0 || buf[15] != 8)
        return NO_ANSWER;
    *value = ((u64)get32(buf + 16) << 32) | get32(buf + 20);
    return 0;
}

/* ---- what the guest's command line asks for ------------------------------ */

void tpm_report(void)
{
    static const char hex[] = "0123456789abcdef";
    u8 pcr[32];
    u64 nv = 0;
    u32 rc = pcr_read(pcr);
    if (rc) {
        error("pcr_read", rc);
        return;
    }
    rc = nv_read(&nv);
    if (rc) {
        error("nv_read", rc);
        return;
    }
    puts("TPM pcr16=");
    for (u32 i = 0; i < 32; i++) {
        putc(hex[pcr[i] >> 4]);
        putc(hex[pcr[i] & 0xF]);
    }
    puts(" nv=");
    put_u64(nv);
    putc('\n');
}

int tpm_boot(const char *marker, u32 n)
{
    u32 id = *reg(CRB_INTF_ID);
    if ((id & 0xF) != 1) { /* InterfaceType 1: CRB */
        error("no_crb", id);
        return 0;
    }
    u32 rc;
    if ((rc = startup())) {
        error("startup", rc);
        return 0;
    }
    if ((rc = pcr_extend(marker, n))) {
        error("pcr_extend", rc);
        return 0;
    }
    if ((rc = nv_define())) {
        error("nv_define", rc);
        return 0;
    }
    if ((rc = nv_increment())) {
        error("nv_increment", rc);
        return 0;
    }
    tpm_report();
    return 1;
}
