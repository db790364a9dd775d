/* Entry of the qtm-workload guest: the multiboot (v1) header, a flat GDT, an IDT whose entries
 * all lead to one C handler, a stack, then workload_main(magic, info).
 *
 * A multiboot loader enters here in 32-bit protected mode with paging off, interrupts off,
 * EAX = 0x2BADB002 and EBX = the physical address of the multiboot information structure. The
 * GDT the loader used may be gone, so we load our own before touching a segment register. */

#define MB_MAGIC 0x1BADB002
/* Bit 0: align modules on pages; bit 1: pass memory information (mem_lower/mem_upper). */
#define MB_FLAGS 0x00000003

    .section .multiboot, "a"
    .align 4
    .long MB_MAGIC
    .long MB_FLAGS
    .long -(MB_MAGIC + MB_FLAGS)

    .text
    .globl _start
_start:
    cli
    lgdt gdt_ptr
    ljmp $0x08, $1f
1:  movw $0x10, %cx
    movw %cx, %ds
    movw %cx, %es
    movw %cx, %fs
    movw %cx, %gs
    movw %cx, %ss
    movl $stack_top, %esp
    cld

    /* IDT: 48 interrupt gates (exceptions 0-31, PIC IRQs at 32-47) to the stubs below. */
    xorl %ecx, %ecx
2:  movl stub_table(,%ecx,4), %edx
    movw %dx, idt(,%ecx,8)            /* offset 15:0 */
    movw $0x08, idt+2(,%ecx,8)        /* code selector */
    movw $0x8E00, idt+4(,%ecx,8)      /* present, ring 0, 32-bit interrupt gate */
    shrl $16, %edx
    movw %dx, idt+6(,%ecx,8)          /* offset 31:16 */
    incl %ecx
    cmpl $48, %ecx
    jne 2b
    lidt idt_ptr

    pushl %ebx
    pushl %eax
    call workload_main
3:  cli
    hlt
    jmp 3b

/* One stub per vector: push the vector number, then the common path calls
 * interrupt(vector) with every general register saved. */
    .macro stub n
stub_\n:
    pushl $\n
    jmp common_stub
    .endm
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23
    stub \n
    .endr
    .irp n, 24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47
    stub \n
    .endr

common_stub:
    pushal
    pushl 32(%esp)                    /* the vector, above the eight saved registers */
    call interrupt
    addl $4, %esp
    popal
    addl $4, %esp
    /* Return without iret: this machine's nested KVM (PVM) emulates 32-bit guests and its
     * emulator cannot execute a protected-mode iret. At the same privilege level iret only pops
     * EIP, CS and EFLAGS, so: restore EFLAGS from a copy, then return past CS and EFLAGS. */
    pushl 8(%esp)
    popfl
    ret $8

    .section .rodata
    .align 4
stub_table:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23
    .long stub_\n
    .endr
    .irp n, 24,25,26,27,28,29,30,31,32,33,34,35,36,37,38,39,40,41,42,43,44,45,46,47
    .long stub_\n
    .endr

    .align 8
gdt:
    .quad 0                           /* null */
    .quad 0x00CF9A000000FFFF          /* 0x08: code, base 0, limit 4 GiB, 32-bit */
    .quad 0x00CF92000000FFFF          /* 0x10: data, base 0, limit 4 GiB */
gdt_end:
gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
idt_ptr:
    .word 48 * 8 - 1
    .long idt

    .bss
    .align 16
idt:
    .skip 48 * 8
stack:
    .skip 16384
stack_top:

    .section .note.GNU-stack, "", @progbits
