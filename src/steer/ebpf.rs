//! The eBPF side of steering: the round-robin and `--sticky ip` programs, written out as
//! instructions (no BPF toolchain at build time), and the bpf(2) calls that create the maps,
//! fill them and load a program. [`super::Steering`] drives them.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
pub(super) const BPF_MAP_TYPE_ARRAY: u32 = 2;
pub(super) const BPF_MAP_TYPE_REUSEPORT_SOCKARRAY: u32 = 20;
const BPF_PROG_TYPE_SK_REUSEPORT: u32 = 21;
/// `expected_attach_type` of a program that also picks the listener for a connection whose
/// listener stopped (Linux 5.14): the kernel then moves a closed socket's queue whatever
/// `net.ipv4.tcp_migrate_req` says.
const BPF_SK_REUSEPORT_SELECT_OR_MIGRATE: u32 = 40;
const BPF_PSEUDO_MAP_FD: u8 = 1;
pub(super) const SO_ATTACH_REUSEPORT_EBPF: libc::c_int = 52;
const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_SK_SELECT_REUSEPORT: i32 = 82;
const SK_PASS: i32 = 1;

/// One eBPF instruction, as the kernel reads it.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct Insn {
    code: u8,
    /// Destination register in the low nibble, source register in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

const fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

/// The round-robin program, given the three maps' descriptors: `state` (an array of two u64:
/// the turn counter, then how many slots are ready), `order` (the ready slots' numbers, the
/// first `ready` entries valid) and `sockets` (slot number to its socket).
pub(super) fn program(state_map: i32, order_map: i32, sockets_map: i32) -> Vec<Insn> {
    // Opcodes (class | size/op | source), from linux/bpf_common.h and linux/bpf.h.
    const MOV64_X: u8 = 0xbf; // dst = src
    const MOV64_K: u8 = 0xb7; // dst = imm
    const ADD64_K: u8 = 0x07; // dst += imm
    const MOD64_X: u8 = 0x9f; // dst %= src (unsigned)
    const LD_IMM64: u8 = 0x18; // dst = 64-bit immediate (here: a map)
    const LDX_DW: u8 = 0x79; // dst = *(u64 *)(src + off)
    const STX_DW: u8 = 0x7b; // *(u64 *)(dst + off) = src
    const STX_W: u8 = 0x63; // *(u32 *)(dst + off) = src
    const ST_W: u8 = 0x62; // *(u32 *)(dst + off) = imm
    const JEQ_K: u8 = 0x15; // if dst == imm goto +off
    const CALL: u8 = 0x85;
    const EXIT: u8 = 0x95;
    // Helpers take their arguments in r1..r5 and return in r0; r6..r9 survive calls.
    let (r0, r1, r2, r3, r4, r6, r7, r8, fp) = (0, 1, 2, 3, 4, 6, 7, 8, 10);
    let map = |dst: u8, fd: i32| {
        [
            insn(LD_IMM64, dst, BPF_PSEUDO_MAP_FD, 0, fd),
            insn(0, 0, 0, 0, 0),
        ]
    };
    // r0 = bpf_map_lookup_elem(map, &key at fp-4), then a jump to the pass if it is NULL
    // (its offset is patched below, once the pass's position is known).
    let lookup = |p: &mut Vec<Insn>, fd: i32| {
        p.extend(map(r1, fd));
        p.extend([
            insn(MOV64_X, r2, fp, 0, 0),
            insn(ADD64_K, r2, 0, 0, -4),
            insn(CALL, 0, 0, 0, HELPER_MAP_LOOKUP_ELEM),
            insn(JEQ_K, r0, 0, 0, 0),
        ]);
    };
    let mut p = vec![
        insn(MOV64_X, r6, r1, 0, 0), // r6 = the context
        insn(ST_W, fp, 0, -4, 0),    // key 0: the counter
    ];
    lookup(&mut p, state_map);
    p.extend([
        insn(LDX_DW, r7, r0, 0, 0), // r7 = counter
        insn(MOV64_X, r2, r7, 0, 0),
        insn(ADD64_K, r2, 0, 0, 1),
        insn(STX_DW, r0, r2, 0, 0), // counter += 1
        insn(ST_W, fp, 0, -4, 1),   // key 1: how many slots are ready
    ]);
    lookup(&mut p, state_map);
    p.extend([
        insn(LDX_DW, r8, r0, 0, 0),  // r8 = ready slots
        insn(JEQ_K, r8, 0, 0, 0),    // none: let the hash choose
        insn(MOD64_X, r7, r8, 0, 0), // r7 = counter % ready
        insn(STX_W, fp, r7, -4, 0),  // key: the turn's place in the order
    ]);
    lookup(&mut p, order_map);
    p.extend([
        insn(LDX_DW, r1, r0, 0, 0),  // r1 = the slot whose turn it is
        insn(STX_W, fp, r1, -8, 0),  // its index, on the stack
        insn(MOV64_X, r1, r6, 0, 0), // the context again
    ]);
    // bpf_sk_select_reuseport(context, map, &index, 0)
    p.extend(map(r2, sockets_map));
    p.extend([
        insn(MOV64_X, r3, fp, 0, 0),
        insn(ADD64_K, r3, 0, 0, -8),
        insn(MOV64_K, r4, 0, 0, 0),
        insn(CALL, 0, 0, 0, HELPER_SK_SELECT_REUSEPORT), // its failure leaves the hash's pick
    ]);
    // The pass: every NULL or zero check above jumps here.
    let pass = p.len();
    for (i, ins) in p.iter_mut().enumerate() {
        if ins.code == JEQ_K {
            ins.off = (pass - i - 1) as i16;
        }
    }
    p.extend([insn(MOV64_K, r0, 0, 0, SK_PASS), insn(EXIT, 0, 0, 0, 0)]);
    p
}

/// The bpf(2) system call with `attr` (a prefix of `union bpf_attr`; the kernel zero-extends).
fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: attr is a valid, initialised repr(C) value of the size passed.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *const T,
            std::mem::size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn owned(fd: libc::c_long) -> OwnedFd {
    // SAFETY: bpf(2) just returned this new descriptor, which nothing else owns.
    unsafe { OwnedFd::from_raw_fd(fd as i32) }
}

pub(super) fn create_map(
    map_type: u32,
    key_size: u32,
    value_size: u32,
    entries: u32,
) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }
    let attr = Attr {
        map_type,
        key_size,
        value_size,
        max_entries: entries,
        map_flags: 0,
    };
    bpf(BPF_MAP_CREATE, &attr).map(owned)
}

pub(super) fn update(map: &OwnedFd, key: u32, value: u64) -> io::Result<()> {
    #[repr(C)]
    struct Attr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let attr = Attr {
        map_fd: map.as_raw_fd() as u32,
        _pad: 0,
        key: &key as *const u32 as u64,
        value: &value as *const u64 as u64,
        flags: 0,
    };
    bpf(BPF_MAP_UPDATE_ELEM, &attr).map(drop)
}

/// Loads a reuseport program: one that also migrates a stopped listener's queue where the
/// kernel allows it (true), else one that only selects (false, Linux before 5.14).
pub(super) fn load(insns: &[Insn]) -> io::Result<(OwnedFd, bool)> {
    match load_as(insns, BPF_SK_REUSEPORT_SELECT_OR_MIGRATE) {
        Ok(fd) => Ok((fd, true)),
        Err(err) if err.raw_os_error() == Some(libc::EPERM) => Err(err),
        Err(_) => load_as(insns, 0).map(|fd| (fd, false)),
    }
}

fn load_as(insns: &[Insn], expected_attach_type: u32) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct Attr {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
        prog_ifindex: u32,
        expected_attach_type: u32,
    }
    let license = c"MIT";
    let mut log = vec![0u8; 16 * 1024];
    let attr = |log_level: u32, log: &mut [u8]| Attr {
        prog_type: BPF_PROG_TYPE_SK_REUSEPORT,
        insn_cnt: insns.len() as u32,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level,
        log_size: if log_level == 0 { 0 } else { log.len() as u32 },
        log_buf: if log_level == 0 {
            0
        } else {
            log.as_mut_ptr() as u64
        },
        kern_version: 0,
        prog_flags: 0,
        prog_name: [0; 16],
        prog_ifindex: 0,
        expected_attach_type,
    };
    match bpf(BPF_PROG_LOAD, &attr(0, &mut log)) {
        Ok(fd) => Ok(owned(fd)),
        // EPERM: not allowed. Anything else (the verifier refused it): load again with the
        // verifier's log, for the reason it gives.
        Err(err) if err.raw_os_error() == Some(libc::EPERM) => Err(err),
        Err(err) => {
            let _ = bpf(BPF_PROG_LOAD, &attr(1, &mut log));
            let text = String::from_utf8_lossy(&log);
            let text = text.trim_end_matches('\0');
            // The reason is the line before the closing statistics.
            let why = text
                .lines()
                .rev()
                .filter(|l| !l.trim().is_empty())
                .nth(1)
                .unwrap_or("");
            Err(io::Error::new(err.kind(), format!("{err}: {why}")))
        }
    }
}

/// The golden-ratio multiplier of the source-address hash (Knuth's multiplicative hash).
pub(super) const HASH_MUL: u32 = 0x9E37_79B1;

/// `--sticky ip` in eBPF: the slot of a hash of the connection's source address
/// (`hash % slots`) while that slot is ready; else a ready slot chosen by the rest of the hash
/// (`hash / slots % ready`). Same maps as [`program`], `order` holding the ready flags of the
/// slots from entry `flags_at` on.
pub(super) fn sticky_program(
    state_map: i32,
    order_map: i32,
    sockets_map: i32,
    slots: u32,
    flags_at: u32,
) -> Vec<Insn> {
    const MOV64_X: u8 = 0xbf;
    const MOV64_K: u8 = 0xb7;
    const ADD64_K: u8 = 0x07;
    const MOD64_K: u8 = 0x97;
    const DIV64_K: u8 = 0x37;
    const MOD64_X: u8 = 0x9f;
    const MUL32_K: u8 = 0x24;
    const XOR32_X: u8 = 0xac;
    const RSH32_K: u8 = 0x74;
    const LD_IMM64: u8 = 0x18;
    const LDX_W: u8 = 0x61; // dst = *(u32 *)(src + off)
    const TO_BE: u8 = 0xdc; // dst = htobe32(dst): the address's words as numbers
    const LDX_DW: u8 = 0x79;
    const STX_W: u8 = 0x63;
    const ST_W: u8 = 0x62;
    const JA: u8 = 0x05;
    const JEQ_K: u8 = 0x15;
    const JNE_K: u8 = 0x55;
    const CALL: u8 = 0x85;
    const EXIT: u8 = 0x95;
    const HELPER_LOAD_BYTES_RELATIVE: i32 = 68;
    const HDR_START_NET: i32 = 1;
    // `sk_reuseport_md.eth_protocol`: after two pointers and `len`; skb->protocol, big-endian.
    const ETH_PROTOCOL: i16 = 20;
    let ipv4 = i32::from(0x0800u16.to_be());
    let ipv6 = i32::from(0x86DDu16.to_be());
    let (r0, r1, r2, r3, r4, r5, r6, r7, r8, r9, fp) = (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10);
    let n = slots as i32;
    let mut a = Asm::default();
    let map = |a: &mut Asm, dst: u8, fd: i32| {
        a.op(insn(LD_IMM64, dst, BPF_PSEUDO_MAP_FD, 0, fd));
        a.op(insn(0, 0, 0, 0, 0));
    };
    // r0 = bpf_map_lookup_elem(map, key at fp-4); NULL: pass.
    let lookup = |a: &mut Asm, fd: i32| {
        map(a, r1, fd);
        a.op(insn(MOV64_X, r2, fp, 0, 0));
        a.op(insn(ADD64_K, r2, 0, 0, -4));
        a.op(insn(CALL, 0, 0, 0, HELPER_MAP_LOOKUP_ELEM));
        a.jump(insn(JEQ_K, r0, 0, 0, 0), "pass");
    };
    // fp-24.. = `len` bytes of the IP header from `offset` (the source address); failed: pass.
    let load = |a: &mut Asm, offset: i32, len: i32| {
        a.op(insn(MOV64_X, r1, r6, 0, 0));
        a.op(insn(MOV64_K, r2, 0, 0, offset));
        a.op(insn(MOV64_X, r3, fp, 0, 0));
        a.op(insn(ADD64_K, r3, 0, 0, -24));
        a.op(insn(MOV64_K, r4, 0, 0, len));
        a.op(insn(MOV64_K, r5, 0, 0, HDR_START_NET));
        a.op(insn(CALL, 0, 0, 0, HELPER_LOAD_BYTES_RELATIVE));
        a.jump(insn(JNE_K, r0, 0, 0, 0), "pass");
        a.op(insn(LDX_W, r7, fp, -24, 0));
        a.op(insn(TO_BE, r7, 0, 0, 32));
    };
    a.op(insn(MOV64_X, r6, r1, 0, 0));
    a.op(insn(LDX_W, r2, r6, ETH_PROTOCOL, 0));
    a.jump(insn(JEQ_K, r2, 0, 0, ipv4), "v4");
    a.jump(insn(JNE_K, r2, 0, 0, ipv6), "pass");
    // IPv6: the source address's four words, folded.
    load(&mut a, 8, 16);
    for off in [-20, -16, -12] {
        a.op(insn(MUL32_K, r7, 0, 0, HASH_MUL as i32));
        a.op(insn(LDX_W, r1, fp, off, 0));
        a.op(insn(TO_BE, r1, 0, 0, 32));
        a.op(insn(XOR32_X, r7, r1, 0, 0));
    }
    a.jump(insn(JA, 0, 0, 0, 0), "mix");
    a.label("v4");
    load(&mut a, 12, 4);
    a.label("mix");
    a.op(insn(MUL32_K, r7, 0, 0, HASH_MUL as i32));
    a.op(insn(RSH32_K, r7, 0, 0, 16)); // r7 = the hash, 16 bits
    a.op(insn(MOV64_X, r8, r7, 0, 0));
    a.op(insn(MOD64_K, r8, 0, 0, n)); // r8 = the address's own slot
    a.op(insn(MOV64_X, r1, r8, 0, 0));
    a.op(insn(ADD64_K, r1, 0, 0, flags_at as i32));
    a.op(insn(STX_W, fp, r1, -4, 0)); // key: its ready flag
    lookup(&mut a, order_map);
    a.op(insn(LDX_DW, r1, r0, 0, 0));
    a.jump(insn(JEQ_K, r1, 0, 0, 0), "elsewhere");
    a.op(insn(MOV64_X, r9, r8, 0, 0));
    a.jump(insn(JA, 0, 0, 0, 0), "select");
    a.label("elsewhere");
    a.op(insn(ST_W, fp, 0, -4, 1)); // key 1: how many slots are ready
    lookup(&mut a, state_map);
    a.op(insn(LDX_DW, r2, r0, 0, 0));
    a.jump(insn(JEQ_K, r2, 0, 0, 0), "pass");
    a.op(insn(DIV64_K, r7, 0, 0, n));
    a.op(insn(MOD64_X, r7, r2, 0, 0));
    a.op(insn(STX_W, fp, r7, -4, 0));
    lookup(&mut a, order_map);
    a.op(insn(LDX_DW, r9, r0, 0, 0));
    a.label("select");
    a.op(insn(STX_W, fp, r9, -8, 0));
    a.op(insn(MOV64_X, r1, r6, 0, 0));
    map(&mut a, r2, sockets_map);
    a.op(insn(MOV64_X, r3, fp, 0, 0));
    a.op(insn(ADD64_K, r3, 0, 0, -8));
    a.op(insn(MOV64_K, r4, 0, 0, 0));
    a.op(insn(CALL, 0, 0, 0, HELPER_SK_SELECT_REUSEPORT));
    a.label("pass");
    a.op(insn(MOV64_K, r0, 0, 0, SK_PASS));
    a.op(insn(EXIT, 0, 0, 0, 0));
    a.finish()
}

/// A tiny assembler for [`sticky_program`]: forward jumps to named labels.
#[derive(Default)]
struct Asm {
    p: Vec<Insn>,
    labels: Vec<(&'static str, usize)>,
    jumps: Vec<(usize, &'static str)>,
}

impl Asm {
    fn op(&mut self, i: Insn) {
        self.p.push(i);
    }
    fn jump(&mut self, i: Insn, to: &'static str) {
        self.jumps.push((self.p.len(), to));
        self.p.push(i);
    }
    fn label(&mut self, name: &'static str) {
        self.labels.push((name, self.p.len()));
    }
    fn finish(mut self) -> Vec<Insn> {
        for (at, to) in self.jumps {
            let target = self
                .labels
                .iter()
                .find(|(name, _)| *name == to)
                .map_or(self.p.len(), |&(_, t)| t);
            self.p[at].off = (target - at - 1) as i16;
        }
        self.p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every jump of the sticky eBPF program lands inside it, forward.
    #[test]
    fn sticky_program_jumps_land_inside() {
        let p = sticky_program(3, 4, 5, 4, 4096);
        for (i, ins) in p.iter().enumerate() {
            if matches!(ins.code, 0x05 | 0x15 | 0x55) {
                let target = i as i64 + 1 + i64::from(ins.off);
                assert!(target > i as i64 && (target as usize) < p.len(), "{i}");
            }
        }
        assert_eq!(p.last().map(|i| i.code), Some(0x95));
    }

    /// Every conditional jump lands on the `r0 = SK_PASS` before `exit`.
    #[test]
    fn the_checks_jump_to_the_pass() {
        let p = program(3, 4, 5);
        let jumps: Vec<usize> = (0..p.len()).filter(|&i| p[i].code == 0x15).collect();
        assert_eq!(jumps.len(), 4);
        for jump in jumps {
            let target = jump + 1 + p[jump].off as usize;
            assert_eq!((p[target].code, p[target].imm), (0xb7, SK_PASS));
            assert_eq!(p[target + 1].code, 0x95);
            assert_eq!(target + 2, p.len());
        }
    }
}
