/*
 * The cpubench loops. This one file is assembled into the cpubench guest AND into the
 * host crate esvm-guests (native_loop_*), so guest and host run identical machine code.
 * GNU assembler directives, Intel syntax without register prefixes (global_asm!'s default;
 * to assemble it with gcc/as directly, add the Intel-syntax/noprefix directive in front).
 *
 * ABI (System V): rdi = iterations n, rsi = 64 KiB scratch buffer (mem loop only).
 * Returns a value in rax that depends on every iteration (compare guest vs. native).
 *
 * Instructions retired per iteration, exactly (the loop bodies below, counted with the
 * closing dec/jnz); setup and exit add at most 8 instructions per call:
 *   esvm_bench_alu     10   register-only ALU ops (add/xor/rol/lea/imul/sub/or/ror)
 *   esvm_bench_mem     10   2 loads + 1 store on a 64 KiB buffer, stride 80 bytes
 *   esvm_bench_branch   8   a data-dependent conditional branch (LCG bit), both paths 8
 * Keep these numbers in sync with bench/loops.rs.
 */
    .text

    .globl esvm_bench_alu
    .balign 16
esvm_bench_alu:
    movabs rax, 0x9e3779b97f4a7c15
    mov rdx, rdi
    movabs rcx, 0x2545f4914f6cdd1d
    test rdi, rdi
    jz 2f
    .balign 16
1:
    add rax, rdx
    xor rdx, rcx
    rol rax, 13
    lea rcx, [rcx + rax*2 + 7]
    imul rdx, rax
    sub rcx, rdx
    or rdx, 1
    ror rcx, 7
    dec rdi
    jnz 1b
2:
    xor rax, rcx
    ret

    .globl esvm_bench_mem
    .balign 16
esvm_bench_mem:
    xor edx, edx
    xor eax, eax
    test rdi, rdi
    jz 2f
    .balign 16
1:
    mov rcx, [rsi + rdx]
    add rcx, rdi
    mov [rsi + rdx], rcx
    add rax, rcx
    mov r8, [rsi + rdx + 8]
    xor rax, r8
    add rdx, 80
    and rdx, 0xfff0
    dec rdi
    jnz 1b
2:
    ret

    .globl esvm_bench_branch
    .balign 16
esvm_bench_branch:
    mov rax, rdi
    movabs r8, 6364136223846793005
    movabs r9, 1442695040888963407
    xor edx, edx
    test rdi, rdi
    jz 4f
    .balign 16
1:
    imul rax, r8
    add rax, r9
    bt rax, 40
    jc 2f
    add rdx, 3
    jmp 3f
2:
    sub rdx, 1
    nop
3:
    dec rdi
    jnz 1b
4:
    add rax, rdx
    ret

