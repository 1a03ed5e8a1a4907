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
//! The program is a few instructions, written out below rather than compiled from C, so the
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

/// The program and its maps, attached to a socket group; kept for the pool's lifetime.
pub struct Steering {
    _program: OwnedFd,
    state: OwnedFd,
    order: OwnedFd,
    sockets: OwnedFd,
}

/// Attaches round-robin steering to the group formed by `sockets` (listening, SO_REUSEPORT,
/// same address), socket `i` being slot `i`'s. Every slot starts ready (in the order). The maps
/// hold up to `capacity` slots, so that a scale can add sockets later (`rejoin`).
pub fn round_robin(sockets: &[&OwnedFd], capacity: u32) -> io::Result<Steering> {
    let slots = u32::try_from(sockets.len())
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| io::Error::other("no sockets to steer"))?;
    let capacity = capacity.max(slots);
    let state = create_map(BPF_MAP_TYPE_ARRAY, 4, 8, 2)?;
    let order = create_map(BPF_MAP_TYPE_ARRAY, 4, 8, capacity)?;
    let group = create_map(BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, capacity)?;
    for (i, socket) in sockets.iter().enumerate() {
        update(&group, i as u32, socket.as_raw_fd() as u64)?;
    }
    let program = load(&program(
        state.as_raw_fd(),
        order.as_raw_fd(),
        group.as_raw_fd(),
    ))?;
    let steering = Steering {
        _program: program,
        state,
        order,
        sockets: group,
    };
    steering.set_ready(&(0..slots).collect::<Vec<_>>())?;
    let fd: libc::c_int = steering._program.as_raw_fd();
    // SAFETY: setsockopt with a pointer to an int of the size passed.
    let ret = unsafe {
        libc::setsockopt(
            sockets[0].as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_EBPF,
            &fd as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(steering)
}

impl Steering {
    /// Deals new connections to these slots only, in turn; to none (the kernel's hash over
    /// the group decides) when the list is empty. The order is written before the count, so
    /// a connection steered in between finds a slot that is, or just was, ready.
    pub fn set_ready(&self, slots: &[u32]) -> io::Result<()> {
        for (i, &slot) in slots.iter().enumerate() {
            update(&self.order, i as u32, u64::from(slot))?;
        }
        update(&self.state, 1, slots.len() as u64)
    }

    /// Puts `socket` back as slot `slot`'s after it listens again (a socket that stops
    /// listening leaves the map).
    pub fn rejoin(&self, slot: u32, socket: &OwnedFd) -> io::Result<()> {
        update(&self.sockets, slot, socket.as_raw_fd() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
