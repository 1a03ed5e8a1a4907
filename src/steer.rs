//! Steer: new connections go to the slots' SO_REUSEPORT sockets in turn.
//!
//! Without help the kernel picks a socket of the group by a hash of each connection's
//! addresses, so N long-lived connections split binomially (see the README's "Benchmarks"):
//! one worker idle part of the time while the other queued. A
//! small eBPF program attached to the group (`SO_ATTACH_REUSEPORT_EBPF`) instead takes a counter
//! from an array map, adds one, and selects the socket of the `counter % ready`-th *ready* slot
//! (an order map lists them) from a `REUSEPORT_SOCKARRAY` map (`bpf_sk_select_reuseport`):
//! round robin, as pm2's primary does, without a process in the data path. The balancer keeps
//! the list current: a slot whose worker is dead, restarting, stopping or not ready yet is
//! left out, so its socket's backlog receives nothing new. The counter is read and written
//! without an atomic operation, so two CPUs taking a SYN at the same instant may pick the same
//! socket; that costs a little evenness, never a connection.
//!
//! When no slot is ready, or the program cannot select (the slot's socket stopped listening or
//! was closed), it passes, and the kernel's hash chooses among the listening sockets. Loading
//! it needs CAP_BPF with CAP_NET_ADMIN, or CAP_SYS_ADMIN: root on a machine, but not what a
//! container gets by default. Without them corepool says so once at start-up and the kernel's
//! hash spreads connections (see `balance` for how not-ready slots leave the group then).
//!
//! `--sticky ip` replaces the turn by a hash of the connection's source address (IPv4 or
//! IPv6, read from the IP header with `bpf_skb_load_bytes_relative`): the address's own slot
//! (`hash % slots`) while it is ready, else a ready slot picked by the rest of the hash
//! (`sticky_program`; proxy mode makes the same choice, `proxy::address_hash`). Where eBPF may
//! not be loaded, [`Classic`] does the same with a classic BPF program, which needs no
//! privilege but can only name a position in the kernel's array of the group's sockets.
//!
//! The programs are a few instructions, written out below rather than compiled from C, so the
//! build needs no BPF toolchain and nothing is loaded that is not in this file.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_MAP_TYPE_REUSEPORT_SOCKARRAY: u32 = 20;
const BPF_PROG_TYPE_SK_REUSEPORT: u32 = 21;
const BPF_PSEUDO_MAP_FD: u8 = 1;
const SO_ATTACH_REUSEPORT_EBPF: libc::c_int = 52;
const HELPER_MAP_LOOKUP_ELEM: i32 = 1;
const HELPER_SK_SELECT_REUSEPORT: i32 = 82;
const SK_PASS: i32 = 1;

/// One eBPF instruction, as the kernel reads it.
#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
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
fn program(state_map: i32, order_map: i32, sockets_map: i32) -> Vec<Insn> {
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

fn create_map(map_type: u32, key_size: u32, value_size: u32, entries: u32) -> io::Result<OwnedFd> {
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

fn update(map: &OwnedFd, key: u32, value: u64) -> io::Result<()> {
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

fn load(insns: &[Insn]) -> io::Result<OwnedFd> {
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
const HASH_MUL: u32 = 0x9E37_79B1;

/// `--sticky ip` in eBPF: the slot of a hash of the connection's source address
/// (`hash % slots`) while that slot is ready; else a ready slot chosen by the rest of the hash
/// (`hash / slots % ready`). Same maps as [`program`], `order` holding the ready flags of the
/// slots from entry `flags_at` on.
fn sticky_program(
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

/// How connections are dealt: in turn, or by source address (`--sticky ip`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Deal {
    Turn,
    Sticky,
}

/// The steering attached to a socket group; kept for the pool's lifetime.
pub enum Steering {
    /// The eBPF program and its maps.
    Ebpf {
        _program: OwnedFd,
        state: OwnedFd,
        order: OwnedFd,
        sockets: OwnedFd,
        /// The pool's slots now (`--sticky ip` hashes over them).
        slots: u32,
        /// The most slots the maps hold; the ready flags start at this index of `order`.
        capacity: u32,
        deal: Deal,
    },
    /// `--sticky ip` without eBPF: a classic BPF program, rewritten on every change.
    Classic(Classic),
}

/// Attaches round-robin steering to the group formed by `sockets` (listening, SO_REUSEPORT,
/// same address), socket `i` being slot `i`'s. Every slot starts ready (in the order). The maps
/// hold up to `capacity` slots, so that a scale can add sockets later (`rejoin`, `resize`).
pub fn round_robin(sockets: &[&OwnedFd], capacity: u32) -> io::Result<Steering> {
    ebpf(sockets, Deal::Turn, capacity)
}

/// Attaches eBPF steering that deals by `deal` to the group formed by `sockets`, as
/// [`round_robin`] does.
pub fn ebpf(sockets: &[&OwnedFd], deal: Deal, capacity: u32) -> io::Result<Steering> {
    let slots = u32::try_from(sockets.len())
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| io::Error::other("no sockets to steer"))?;
    let capacity = capacity.max(slots);
    let state = create_map(BPF_MAP_TYPE_ARRAY, 4, 8, 2)?;
    // The ready slots in order, then each slot's ready flag (from `capacity` on).
    let order = create_map(BPF_MAP_TYPE_ARRAY, 4, 8, 2 * capacity)?;
    let group = create_map(BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, capacity)?;
    for (i, socket) in sockets.iter().enumerate() {
        update(&group, i as u32, socket.as_raw_fd() as u64)?;
    }
    let (s, o, g) = (state.as_raw_fd(), order.as_raw_fd(), group.as_raw_fd());
    let program = load(&match deal {
        Deal::Turn => program(s, o, g),
        Deal::Sticky => sticky_program(s, o, g, slots, capacity),
    })?;
    let fd: libc::c_int = program.as_raw_fd();
    let steering = Steering::Ebpf {
        _program: program,
        state,
        order,
        sockets: group,
        slots,
        capacity,
        deal,
    };
    steering.set_ready(&(0..slots).collect::<Vec<_>>(), &[], &[])?;
    attach(sockets[0], SO_ATTACH_REUSEPORT_EBPF, &fd)?;
    Ok(steering)
}

/// setsockopt(SOL_SOCKET, `option`, `value`) on `socket`.
fn attach<T>(socket: &OwnedFd, option: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: setsockopt with a pointer to a live value of the size passed.
    let ret = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            value as *const T as *const libc::c_void,
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Steering {
    /// Deals new connections to these slots only (in turn, or by address); to none (the
    /// kernel's hash over the group decides) when the list is empty. The order is written
    /// before the count, so a connection steered in between finds a slot that is, or just
    /// was, ready. `sockets` (each slot's, None once closed) matter to the classic program.
    /// `leaving`: sockets of slots a scale removed, still in the group until they are closed.
    pub fn set_ready(
        &self,
        ready: &[u32],
        sockets: &[Option<OwnedFd>],
        leaving: &[&OwnedFd],
    ) -> io::Result<()> {
        match self {
            Steering::Ebpf {
                state,
                order,
                slots,
                capacity,
                ..
            } => {
                for (i, &slot) in ready.iter().enumerate() {
                    update(order, i as u32, u64::from(slot))?;
                }
                for slot in 0..*slots {
                    update(order, capacity + slot, u64::from(ready.contains(&slot)))?;
                }
                update(state, 1, ready.len() as u64)
            }
            Steering::Classic(classic) => classic.set_ready(ready, sockets, leaving),
        }
    }

    /// Puts `socket` back as slot `slot`'s after it listens again (a socket that stops
    /// listening leaves the map).
    pub fn rejoin(&self, slot: u32, socket: &OwnedFd) -> io::Result<()> {
        match self {
            Steering::Ebpf { sockets, .. } => update(sockets, slot, socket.as_raw_fd() as u64),
            // Seen by the next set_ready.
            Steering::Classic(_) => Ok(()),
        }
    }

    /// Deals by `deal` from now on: the eBPF program replaced in place, its maps kept (a
    /// socket can be in one socket map only). `socket`: one in the group. On failure nothing
    /// changed.
    pub fn redeal(&mut self, deal: Deal, socket: &OwnedFd) -> io::Result<()> {
        let Steering::Ebpf {
            _program: current,
            state,
            order,
            sockets,
            slots,
            capacity,
            deal: dealt,
        } = self
        else {
            return Err(io::Error::other("not an eBPF steering"));
        };
        let (s, o, g) = (state.as_raw_fd(), order.as_raw_fd(), sockets.as_raw_fd());
        let program = load(&match deal {
            Deal::Turn => program(s, o, g),
            Deal::Sticky => sticky_program(s, o, g, *slots, *capacity),
        })?;
        attach(socket, SO_ATTACH_REUSEPORT_EBPF, &program.as_raw_fd())?;
        *current = program;
        *dealt = deal;
        Ok(())
    }

    /// The pool now has `slots` slots (a scale). eBPF: the ready flags of the slots added or
    /// removed are cleared (a new slot is dealt to once it is ready), and the sticky program,
    /// which hashes over the slot count, is loaded again for the new count (attached through
    /// `socket`, one listening in the group). Classic: the next `set_ready` writes the program
    /// for the new count.
    pub fn resize(&mut self, new: u32, socket: Option<&OwnedFd>) -> io::Result<()> {
        match self {
            Steering::Ebpf {
                order,
                slots,
                capacity,
                deal,
                ..
            } => {
                if new > *capacity {
                    return Err(io::Error::other(format!(
                        "{new} slots: the steering holds {capacity}"
                    )));
                }
                let old = *slots;
                for slot in old.min(new)..old.max(new) {
                    update(order, *capacity + slot, 0)?;
                }
                if old == new || *deal == Deal::Turn {
                    *slots = new;
                    return Ok(());
                }
                let socket = socket.ok_or_else(|| io::Error::other("no socket listens"))?;
                *slots = new;
                if let Err(err) = self.redeal(Deal::Sticky, socket) {
                    if let Steering::Ebpf { slots, .. } = self {
                        *slots = old;
                    }
                    return Err(err);
                }
                Ok(())
            }
            Steering::Classic(classic) => {
                classic.slots = new;
                Ok(())
            }
        }
    }

    /// Whether `set_ready` must be called on every change of the group, not only of the
    /// ready slots (the classic program).
    pub fn follows_group(&self) -> bool {
        matches!(self, Steering::Classic(_))
    }

    /// `socket` just stopped listening (shutdown): it left the group.
    pub fn left(&self, socket: &OwnedFd) {
        if let Steering::Classic(classic) = self {
            classic.left(socket);
        }
    }
}

/// `--sticky ip` where eBPF may not be loaded: a classic BPF program attached to the group
/// with SO_ATTACH_REUSEPORT_CBPF, which needs no privilege. Such a program can only return an
/// index into the kernel's array of the group's listening sockets, and that array is ordered
/// by when each socket last started listening: a socket that stops listening (corepool's
/// `shutdown`, or closing) is replaced by the last one, one that listens again is appended.
/// Corepool keeps a copy of that order (`group`), applying its own shutdowns as they happen
/// and finding sockets that listen again (a Node worker's own `listen()`) by SO_ACCEPTCONN
/// before each rewrite; two sockets that both start listening between two rewrites are
/// assumed to have done so in slot order. The copy names sockets by inode, not slot: after a
/// scale down, a removed slot's socket stays in the group (and takes its place in the array)
/// until it is closed, even when a scale up has given its slot number a new socket meanwhile. The slot numbers of the program (hash of the
/// address, as in eBPF) are turned into indices when it is written, so it is written again,
/// and attached again, on every change of the ready slots.
pub struct Classic {
    slots: u32,
    /// The group's listening sockets, as inode numbers, in the kernel's order.
    group: std::sync::Mutex<Vec<u64>>,
}

/// A socket's inode number (0 when it cannot be read: matches no listening socket).
fn inode(socket: &OwnedFd) -> u64 {
    nix::sys::stat::fstat(socket).map_or(0, |st| st.st_ino)
}

const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// Attaches the classic program to the group formed by `sockets` (all listening, in slot
/// order, as they were made), every slot ready.
pub fn classic(sockets: &[&OwnedFd]) -> io::Result<Steering> {
    let slots = u32::try_from(sockets.len())
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| io::Error::other("no sockets to steer"))?;
    let classic = Classic {
        slots,
        group: std::sync::Mutex::new(sockets.iter().map(|s| inode(s)).collect()),
    };
    let all: Vec<u32> = (0..slots).collect();
    classic.attach_program(sockets[0], &all, &all)?;
    Ok(Steering::Classic(classic))
}

/// Whether a socket listens (SO_ACCEPTCONN); false when that cannot be read.
fn listening(socket: &OwnedFd) -> bool {
    nix::sys::socket::getsockopt(socket, nix::sys::socket::sockopt::AcceptConn).unwrap_or(false)
}

impl Classic {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        self.group
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn left(&self, socket: &OwnedFd) {
        let ino = inode(socket);
        let mut group = self.lock();
        if let Some(i) = group.iter().position(|&s| s == ino) {
            group.swap_remove(i);
        }
    }

    fn set_ready(
        &self,
        ready: &[u32],
        sockets: &[Option<OwnedFd>],
        leaving: &[&OwnedFd],
    ) -> io::Result<()> {
        let mut group = self.lock();
        // Every socket the pool holds, by inode: the slots' (with their slot number), then
        // those of removed slots (still in the group until closed; never chosen).
        let held: Vec<(u64, Option<u32>, &OwnedFd)> = sockets
            .iter()
            .enumerate()
            .filter_map(|(slot, s)| s.as_ref().map(|s| (inode(s), Some(slot as u32), s)))
            .chain(leaving.iter().map(|s| (inode(s), None, *s)))
            .collect();
        let find = |ino: u64| held.iter().find(|(i, _, _)| *i == ino);
        // Closed or no longer listening: gone from the kernel's array the same way.
        while let Some(i) = group
            .iter()
            .position(|&ino| !find(ino).is_some_and(|(_, _, s)| listening(s)))
        {
            group.swap_remove(i);
        }
        for (ino, slot, socket) in &held {
            if slot.is_some_and(|s| s < self.slots) && !group.contains(ino) && listening(socket) {
                group.push(*ino);
            }
        }
        // The group as slot numbers for the program (u32::MAX: a removed slot's).
        let slots: Vec<u32> = group
            .iter()
            .map(|&ino| find(ino).and_then(|(_, slot, _)| *slot).unwrap_or(u32::MAX))
            .collect();
        let Some(first) = group.first().and_then(|&ino| find(ino)).map(|(_, _, s)| *s) else {
            return Ok(());
        };
        self.attach_program(first, ready, &slots)
    }

    fn attach_program(&self, socket: &OwnedFd, ready: &[u32], group: &[u32]) -> io::Result<()> {
        let mut filter = classic_program(self.slots, ready, group);
        let program = libc::sock_fprog {
            len: filter.len() as u16,
            filter: filter.as_mut_ptr(),
        };
        attach(socket, SO_ATTACH_REUSEPORT_CBPF, &program)
    }
}

/// The classic program: the same choice as [`sticky_program`] (the address's own slot while
/// ready, else a ready one by the rest of the hash), returning the chosen slot's index in
/// `group`; an index past the group's end (u32::MAX) lets the kernel's hash choose.
fn classic_program(slots: u32, ready: &[u32], group: &[u32]) -> Vec<libc::sock_filter> {
    const LD_W_ABS: u16 = 0x20;
    const LD_H_ABS: u16 = 0x28;
    const LD_MEM: u16 = 0x60;
    const ST: u16 = 0x02;
    const TAX: u16 = 0x07;
    const MUL_K: u16 = 0x24;
    const DIV_K: u16 = 0x34;
    const MOD_K: u16 = 0x94;
    const RSH_K: u16 = 0x74;
    const XOR_X: u16 = 0xac;
    const JA: u16 = 0x05;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    // Loads relative to the network header, and skb->protocol (linux/filter.h).
    const NET: u32 = (-0x0010_0000i32) as u32;
    const PROTOCOL: u32 = (-0x1000i32) as u32;
    const HASH: u32 = u32::MAX;
    let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    let index = |slot: u32| {
        group
            .iter()
            .position(|&s| s == slot)
            .map_or(HASH, |i| i as u32)
    };
    let mut p = vec![
        op(LD_H_ABS, 0, 0, PROTOCOL),
        op(JEQ_K, 16, 0, 0x0800), // IPv4: to the load of its source below
        op(JEQ_K, 1, 0, 0x86DD),
        op(RET_K, 0, 0, HASH),
        // IPv6: its source address's four words, folded.
        op(LD_W_ABS, 0, 0, NET + 8),
        op(MUL_K, 0, 0, HASH_MUL),
        op(TAX, 0, 0, 0),
        op(LD_W_ABS, 0, 0, NET + 12),
        op(XOR_X, 0, 0, 0),
        op(MUL_K, 0, 0, HASH_MUL),
        op(TAX, 0, 0, 0),
        op(LD_W_ABS, 0, 0, NET + 16),
        op(XOR_X, 0, 0, 0),
        op(MUL_K, 0, 0, HASH_MUL),
        op(TAX, 0, 0, 0),
        op(LD_W_ABS, 0, 0, NET + 20),
        op(XOR_X, 0, 0, 0),
        op(JA, 0, 0, 1),
        op(LD_W_ABS, 0, 0, NET + 12), // IPv4 source
        op(MUL_K, 0, 0, HASH_MUL),
        op(RSH_K, 0, 0, 16),
        op(ST, 0, 0, 0), // M[0] = the hash
        op(MOD_K, 0, 0, slots),
    ];
    // The address's own slot: its index while ready, else on to "elsewhere".
    let own_at = p.len();
    let mut to_elsewhere = Vec::new();
    for slot in 0..slots {
        p.push(op(JEQ_K, 0, 1, slot));
        if ready.contains(&slot) {
            p.push(op(RET_K, 0, 0, index(slot)));
        } else {
            to_elsewhere.push(p.len());
            p.push(op(JA, 0, 0, 0));
        }
    }
    let elsewhere = p.len();
    debug_assert!(own_at < elsewhere);
    for at in to_elsewhere {
        p[at].k = (elsewhere - at - 1) as u32;
    }
    if ready.is_empty() {
        p.push(op(RET_K, 0, 0, HASH));
        return p;
    }
    p.extend([
        op(LD_MEM, 0, 0, 0),
        op(DIV_K, 0, 0, slots),
        op(MOD_K, 0, 0, ready.len() as u32),
    ]);
    for (i, &slot) in ready.iter().enumerate() {
        p.push(op(JEQ_K, 0, 1, i as u32));
        p.push(op(RET_K, 0, 0, index(slot)));
    }
    p.push(op(RET_K, 0, 0, HASH));
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a classic program (the instructions `classic_program` uses) on a packet whose
    /// network header is `ip` and whose protocol is `proto`.
    fn run_classic(p: &[libc::sock_filter], proto: u16, ip: &[u8]) -> u32 {
        let (mut a, mut x, mut m0, mut pc) = (0u32, 0u32, 0u32, 0usize);
        loop {
            let i = p[pc];
            pc += 1;
            match i.code {
                0x28 => a = u32::from(proto),
                0x20 => {
                    let at = (i.k - (-0x0010_0000i32) as u32) as usize;
                    a = u32::from_be_bytes(ip[at..at + 4].try_into().unwrap());
                }
                0x60 => a = m0,
                0x02 => m0 = a,
                0x07 => x = a,
                0x24 => a = a.wrapping_mul(i.k),
                0x34 => a /= i.k,
                0x94 => a %= i.k,
                0x74 => a >>= i.k,
                0xac => a ^= x,
                0x05 => pc += i.k as usize,
                0x15 => pc += usize::from(if a == i.k { i.jt } else { i.jf }),
                0x06 => return i.k,
                code => panic!("unexpected opcode {code:#x}"),
            }
        }
    }

    fn ipv4_header(source: [u8; 4]) -> Vec<u8> {
        let mut h = vec![0x45u8; 20];
        h[12..16].copy_from_slice(&source);
        h
    }

    fn ipv6_header(source: std::net::Ipv6Addr) -> Vec<u8> {
        let mut h = vec![0x60u8; 40];
        h[8..24].copy_from_slice(&source.octets());
        h
    }

    /// The classic program picks the slot `crate::proxy::address_hash` names (proxy mode's
    /// choice), returned as that slot's position in the kernel's array of the group.
    #[test]
    fn classic_program_picks_the_addresses_slot_at_its_place_in_the_group() {
        let group = [2, 0, 1]; // slot 2 listens first, then 0, then 1
        let p = classic_program(3, &[0, 1, 2], &group);
        for last in 1..=40u8 {
            let ip = std::net::Ipv4Addr::new(10, 1, 7, last);
            let slot = crate::proxy::address_hash(ip.into()) % 3;
            let index = run_classic(&p, 0x0800, &ipv4_header(ip.octets()));
            assert_eq!(group[index as usize], slot, "{ip}");
        }
        let ip: std::net::Ipv6Addr = "2001:db8::17".parse().unwrap();
        let slot = crate::proxy::address_hash(ip.into()) % 3;
        let index = run_classic(&p, 0x86DD, &ipv6_header(ip));
        assert_eq!(group[index as usize], slot);
        // Neither IPv4 nor IPv6: the kernel's hash.
        assert_eq!(run_classic(&p, 0x0806, &[0; 40]), u32::MAX);
    }

    /// A slot not ready sends its addresses to ready ones, and the others keep theirs; none
    /// ready: the kernel's hash.
    #[test]
    fn classic_program_skips_slots_not_ready() {
        let group = [0, 1, 2];
        let all = classic_program(3, &[0, 1, 2], &group);
        let without_1 = classic_program(3, &[0, 2], &group);
        let mut moved = 0;
        for last in 1..=60u8 {
            let h = ipv4_header([192, 168, 3, last]);
            let before = run_classic(&all, 0x0800, &h);
            let now = run_classic(&without_1, 0x0800, &h);
            assert_ne!(now, 1);
            if before != 1 {
                assert_eq!(now, before);
            } else {
                moved += 1;
            }
        }
        assert!(moved > 0);
        let none = classic_program(3, &[], &group);
        assert_eq!(
            run_classic(&none, 0x0800, &ipv4_header([1, 2, 3, 4])),
            u32::MAX
        );
    }

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
