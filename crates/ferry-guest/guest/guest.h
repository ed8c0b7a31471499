/* What guest.c and tpm.c share: hw.c's serial console and clock. */
#ifndef FERRY_GUEST_H
#define FERRY_GUEST_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

void serial_init(void);
void putc(char c);
void puts(const char *s);
void put_u64(u64 v);
void put_u32(u32 v);
/* Milliseconds of guest time; must be called at least every 54 ms. */
u32 clock_ms(void);
/* Start the clock at 0 ms. */
void clock_init(void);

/* tpm.c: the vTPM test (command line `tpm=MARKER`). */
#define TPM_MARKER_MAX 32u
/* Extend PCR 16 with the marker, bump the NV counter, print a TPM line.
 * Returns 0 if the TPM did not answer (an error line says why). */
int tpm_boot(const char *marker, u32 len);
/* Read PCR 16 and the NV counter again and print a TPM line. */
void tpm_report(void);

#endif
