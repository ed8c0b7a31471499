/*
 * Entry point of the ferry test guest: the multiboot header and a stack.
 *
 * QEMU's multiboot loader enters here in 32-bit protected mode with paging
 * off, interrupts off, EAX = 0x2BADB002 and EBX = physical address of the
 * multiboot info structure. Everything else happens in guest.c.
 */
        .set MB_HEADER_MAGIC, 0x1BADB002
        /* bit 0: align modules on pages, bit 1: we need mem_lower/mem_upper. */
        .set MB_HEADER_FLAGS, 0x00000003

        /* First in the image (see link.ld) so it lies in the first 8 KiB. */
        .section .multiboot, "a"
        .align 4
        .long MB_HEADER_MAGIC
        .long MB_HEADER_FLAGS
        .long -(MB_HEADER_MAGIC + MB_HEADER_FLAGS)

        .section .bss
        .align 16
stack_bottom:
        .skip 16384
stack_top:

        .section .text
        .global _start
_start:
        cli
        cld
        mov     $stack_top, %esp
        /* kmain(magic, info): cdecl, arguments pushed right to left. */
        push    %ebx
        push    %eax
        call    kmain
        /* kmain never returns; halt for good if it somehow does. */
1:      cli
        hlt
        jmp     1b

        /* The guest has no notion of an executable stack; silence ld. */
        .section .note.GNU-stack, "", @progbits
