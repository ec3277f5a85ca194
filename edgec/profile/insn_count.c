/*
 * qemu TCG plugin: counts executed guest instructions, and among them AdvSIMD (NEON) vector
 * data-processing instructions, so an emulated inference gets a deterministic cost.
 *
 * The guest marks the start and end of what it wants counted by calling close() on a file
 * descriptor that cannot exist (MARKER_FD, see device_runner.py); at every marker the running
 * totals are recorded. At exit one line "total vector" per marker goes to the file named by
 * the plugin argument out=PATH.
 *
 * Counting is per translation block (one inline add per executed block) to keep the overhead
 * small; the adds are not atomic, so count single-threaded guests only.
 */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <qemu-plugin.h>

QEMU_PLUGIN_EXPORT int qemu_plugin_version = QEMU_PLUGIN_VERSION;

#define AARCH64_SYS_CLOSE 57
#define MARKER_FD 0x7edc0de
#define MAX_MARKERS 64

static uint64_t total, vector;
static uint64_t marks[MAX_MARKERS][2];
static int n_marks;
static char out_path[4096];

/* AdvSIMD vector data processing: bit 31 = 0 and bits 28..25 = 0111. */
static int is_vector(const struct qemu_plugin_insn *insn)
{
    uint32_t word;
    if (qemu_plugin_insn_size(insn) != sizeof(word)) {
        return 0;
    }
    memcpy(&word, qemu_plugin_insn_data(insn), sizeof(word));
    return (word & 0x9e000000u) == 0x0e000000u;
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    size_t n = qemu_plugin_tb_n_insns(tb);
    uint64_t vec = 0;
    for (size_t i = 0; i < n; i++) {
        vec += is_vector(qemu_plugin_tb_get_insn(tb, i));
    }
    qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &total, n);
    if (vec) {
        qemu_plugin_register_vcpu_tb_exec_inline(tb, QEMU_PLUGIN_INLINE_ADD_U64, &vector, vec);
    }
}

static void on_syscall(qemu_plugin_id_t id, unsigned int vcpu, int64_t num, uint64_t a1,
                       uint64_t a2, uint64_t a3, uint64_t a4, uint64_t a5, uint64_t a6,
                       uint64_t a7, uint64_t a8)
{
    if (num == AARCH64_SYS_CLOSE && a1 == MARKER_FD && n_marks < MAX_MARKERS) {
        marks[n_marks][0] = total;
        marks[n_marks][1] = vector;
        n_marks++;
    }
}

static void write_marks(qemu_plugin_id_t id, void *data)
{
    FILE *out = fopen(out_path, "w");
    if (!out) {
        perror(out_path);
        return;
    }
    for (int i = 0; i < n_marks; i++) {
        fprintf(out, "%" PRIu64 " %" PRIu64 "\n", marks[i][0], marks[i][1]);
    }
    fclose(out);
}

QEMU_PLUGIN_EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info,
                                           int argc, char **argv)
{
    for (int i = 0; i < argc; i++) {
        if (strncmp(argv[i], "out=", 4) == 0) {
            snprintf(out_path, sizeof(out_path), "%s", argv[i] + 4);
        }
    }
    if (!out_path[0]) {
        fprintf(stderr, "insn_count: give the output file as out=PATH\n");
        return -1;
    }
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_vcpu_syscall_cb(id, on_syscall);
    qemu_plugin_register_atexit_cb(id, write_marks, NULL);
    return 0;
}
