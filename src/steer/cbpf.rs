//! The classic-BPF fallback of `--sticky ip` (no privilege needed): a program that names a
//! position in the kernel's array of the group's sockets, and [`Classic`], the copy of that
//! array's order it is written from.

use super::ebpf::HASH_MUL;
use super::{Steering, attach};
use std::io;
use std::os::fd::OwnedFd;

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
    pub(super) slots: u32,
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

    pub(super) fn left(&self, socket: &OwnedFd) {
        let ino = inode(socket);
        let mut group = self.lock();
        if let Some(i) = group.iter().position(|&s| s == ino) {
            group.swap_remove(i);
        }
    }

    pub(super) fn set_ready(
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
}
