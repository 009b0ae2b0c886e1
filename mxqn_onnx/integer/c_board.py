"""C export for a Cortex-M board (``export-c --board mps2-an386``): startup code, linker script
and a Makefile next to the model, so that

    make -C DIR                          # DIR/model.elf with arm-none-eabi-gcc
    make -C DIR qemu IN=in.bin OUT=out.bin

builds the model with the same ``main.c`` harness as the host and runs it under
``qemu-system-arm``: the harness reads and writes raw float32 files on the host through
semihosting (newlib's ``--specs=rdimon.specs``; relative paths are relative to DIR, as for
any ``make -C``). The startup code copies ``.data``, clears ``.bss``, turns the FPU on, starts a
free-running 32-bit CMSDK timer (25 MHz) that the harness reads around each ``mxqn_run``, takes
the command line from the semihosting host and calls ``main``.

Under ``make qemu`` QEMU runs with ``-icount shift=0``: one virtual nanosecond per executed
instruction, so 40 timer ticks are 40 instructions and the harness's count is deterministic
(to 40 instructions) whatever the host machine's speed.
"""

from __future__ import annotations

from typing import Dict

#: board -> (QEMU machine, gcc -mcpu/-mfpu flags, code memory, data memory, description)
BOARDS: Dict[str, dict] = {
    "mps2-an386": dict(machine="mps2-an386", cpu="-mcpu=cortex-m4 -mfpu=fpv4-sp-d16 -mfloat-abi=hard",
                       flash=(0x00000000, 4 << 20), ram=(0x21000000, 16 << 20), core="Cortex-M4F"),
    "mps2-an500": dict(machine="mps2-an500", cpu="-mcpu=cortex-m7 -mfpu=fpv5-sp-d16 -mfloat-abi=hard",
                       flash=(0x00000000, 4 << 20), ram=(0x60000000, 16 << 20), core="Cortex-M7"),
}
#: timer ticks of the 25 MHz APB timer per instruction under QEMU's -icount shift=0 (1 ns each)
INSNS_PER_TICK = 40
STACK_BYTES = 16 * 1024
HEAP_BYTES = 16 * 1024

STARTUP = r"""/* {marker}: startup for {board} ({core}) under QEMU, with semihosting.
 * Compiled only for the board (make defines MXQN_BOARD); a host build of every .c file skips it. */
#ifdef MXQN_BOARD
#include <stdint.h>
#include <string.h>

extern uint32_t __data_load, __data_start, __data_end, __bss_start__, __bss_end__, __stack_top;
extern int main(int argc, char **argv);
extern void initialise_monitor_handles(void);
extern void exit(int status);

#define TIMER0 ((volatile uint32_t *)0x40000000u) /* CMSDK APB timer 0: CTRL, VALUE, RELOAD */

/* free-running 32-bit count of 25 MHz timer ticks since reset (the timer counts down) */
unsigned long mxqn_board_ticks(void)
{{
    return (unsigned long)(0xFFFFFFFFu - TIMER0[1]);
}}

static int semihost(int op, void *arg)
{{
    register int r0 __asm__("r0") = op;
    register void *r1 __asm__("r1") = arg;
    __asm__ volatile("bkpt 0xAB" : "+r"(r0) : "r"(r1) : "memory");
    return r0;
}}

static char cmdline[512];
static char *argv_buf[8];

static void fault(void)
{{
    semihost(0x18, (void *)0x20023); /* SYS_EXIT, run-time error: QEMU exits with status 1 */
    for (;;)
        ;
}}

void Reset_Handler(void)
{{
    uint32_t *src = &__data_load, *dst = &__data_start;
    struct {{ char *buf; int len; }} cl = {{cmdline, (int)sizeof cmdline - 1}};
    int argc = 0;
    char *p;
    while (dst < &__data_end)
        *dst++ = *src++;
    for (dst = &__bss_start__; dst < &__bss_end__; dst++)
        *dst = 0;
    *(volatile uint32_t *)0xE000ED88u |= 0xFu << 20; /* CPACR: CP10, CP11 full access (the FPU) */
    __asm__ volatile("dsb\n\tisb" ::: "memory");
    TIMER0[2] = 0xFFFFFFFFu; /* RELOAD */
    TIMER0[1] = 0xFFFFFFFFu; /* VALUE */
    TIMER0[0] = 1u;          /* CTRL: enable */
    initialise_monitor_handles();
    if (semihost(0x15, &cl) == 0) {{ /* SYS_GET_CMDLINE: "model.elf IN OUT" */
        cmdline[sizeof cmdline - 1] = 0;
        for (p = cmdline; *p && argc < 7;) {{
            while (*p == ' ')
                *p++ = 0;
            if (!*p)
                break;
            argv_buf[argc++] = p;
            while (*p && *p != ' ')
                p++;
        }}
    }}
    argv_buf[argc] = 0;
    exit(main(argc, argv_buf));
}}

void Default_Handler(void)
{{
    fault();
}}

__attribute__((section(".vectors"), used)) static void (*const vectors[16])(void) = {{
    (void (*)(void))&__stack_top, Reset_Handler, Default_Handler, Default_Handler, Default_Handler,
    Default_Handler, Default_Handler, 0, 0, 0, 0, Default_Handler, Default_Handler, 0, Default_Handler,
    Default_Handler,
}};
#else
typedef int mxqn_startup_is_for_the_board;
#endif
"""

LINKER = """/* {marker}: memory map of {board} ({core}) as QEMU models it */
MEMORY
{{
    FLASH (rx)  : ORIGIN = 0x{flash0:08X}, LENGTH = {flash_len}
    RAM   (rwx) : ORIGIN = 0x{ram0:08X}, LENGTH = {ram_len}
}}
ENTRY(Reset_Handler)
SECTIONS
{{
    .text : {{
        KEEP(*(.vectors))
        *(.text*)
        *(.rodata*)
        . = ALIGN(4);
    }} > FLASH
    .ARM.exidx : {{ *(.ARM.exidx* .gnu.linkonce.armexidx.*) }} > FLASH
    __data_load = LOADADDR(.data);
    .data : {{
        __data_start = .;
        *(.data*)
        . = ALIGN(4);
        __data_end = .;
    }} > RAM AT > FLASH
    .bss (NOLOAD) : {{
        __bss_start__ = .;
        *(.bss*)
        *(COMMON)
        . = ALIGN(8);
        __bss_end__ = .;
    }} > RAM
    /* the harness's C library (semihosting stdio buffers) */
    .heap (NOLOAD) : {{
        end = .;
        __end__ = .;
        . += {heap};
        __heap_limit = .;
    }} > RAM
    .stack (NOLOAD) : {{
        . = ALIGN(8);
        __stack_limit = .;
        . += {stack};
        __stack_top = .;
    }} > RAM
}}
"""

MAKEFILE = """# {marker}: build for {board} ({core}) and run under QEMU.
#   make                                   model.elf (arm-none-eabi-gcc, newlib + semihosting)
#   make qemu IN=in.bin OUT=out.bin        run it: raw float32 in, raw float32 out
#   make profile IN=in.bin OUT=out.bin     the same with a per-step count of timer ticks
#   make size                              flash and RAM (arm-none-eabi-size)
#   make host                              ./run for this machine (cc; HOST_CFLAGS="-O2 -march=native" for its SIMD)
# Paths are relative to this folder (make -C DIR ... changes into it first).
CC      = arm-none-eabi-gcc
SIZE    = arm-none-eabi-size
QEMU    = qemu-system-arm
CPU     = {cpu}
CFLAGS  = $(CPU) -mthumb -O2 -std=c99 -ffp-contract=off -ffunction-sections -fdata-sections -Wall -Wextra \\
          -DMXQN_BOARD
LDFLAGS = $(CPU) -mthumb --specs=rdimon.specs -nostartfiles -T board.ld -Wl,--gc-sections
SRCS    = model.c main.c startup.c
HOST_CC     ?= cc
HOST_CFLAGS ?= -O2
IN      ?= in.bin
OUT     ?= out.bin

model.elf: $(SRCS) model.h board.ld
\t$(CC) $(CFLAGS) $(LDFLAGS) -o $@ $(SRCS) -lm

qemu: model.elf
\t$(QEMU) -machine {machine} -nographic -monitor none -serial none -icount shift=0,sleep=off \\
\t    -semihosting-config enable=on,target=native -kernel model.elf -append "$(IN) $(OUT)"

model_prof.elf: $(SRCS) model.h board.ld
\t$(CC) $(CFLAGS) -DMXQN_PROFILE $(LDFLAGS) -o $@ $(SRCS) -lm

# the timer ticks of every step (40 instructions each under -icount shift=0), on stderr
profile: model_prof.elf
\t$(QEMU) -machine {machine} -nographic -monitor none -serial none -icount shift=0,sleep=off \\
\t    -semihosting-config enable=on,target=native -kernel model_prof.elf -append "$(IN) $(OUT)"

size: model.elf
\t$(SIZE) -A model.elf

host: model.c main.c model.h
\t$(HOST_CC) $(HOST_CFLAGS) -std=c99 -o run model.c main.c -lm

.PHONY: qemu profile size host
"""


def board_files(board: str, marker: str) -> Dict[str, str]:
    """The extra files of a board export (startup.c, board.ld, Makefile)."""
    b = BOARDS[board]
    fmt = dict(marker=marker, board=board, core=b["core"], machine=b["machine"], cpu=b["cpu"])
    return {
        "startup.c": STARTUP.format(**fmt),
        "board.ld": LINKER.format(flash0=b["flash"][0], flash_len=b["flash"][1], ram0=b["ram"][0],
                                  ram_len=b["ram"][1], heap=HEAP_BYTES, stack=STACK_BYTES, **fmt),
        "Makefile": MAKEFILE.format(**fmt),
    }
