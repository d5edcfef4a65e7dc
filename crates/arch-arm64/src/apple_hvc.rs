//! Apple's CPU-service hypercalls, which VMAPPLE kernels make with `hvc #0`.
//!
//! Function IDs are XNU's (`osfmk/arm64/hv_hvc.h`): fast, 64-bit calls in
//! the SMCCC "CPU service" range, 0xC100_0000 + n. The answers follow what
//! Hypervisor.framework does for a VM in its vmapple mode, as
//! reverse-engineered in zhuowei/HvDecompile: the pointer-authentication
//! key calls load the vCPU's key registers (a key call's x1 is the low half
//! of the first key; the other halves and keys follow as x1 + 1, + 2, + 3),
//! GET_DEFAULT_KEYS reports the initial keys, and every known call returns
//! x0 = 0. XNU 26 spins if SET_INITIAL_STATE fails.
//!
//! Not modelled: Apple's own APCTL_EL1 and KERNKEY registers, which the
//! EL0-diversifier calls set. The Arm CPUs vmapple runs on have no such
//! registers; those calls succeed without effect (docs/macos.md).
//!
//! Discovery: the SMCCC-style CPU-service UID, revision and features
//! queries (32-bit fast calls 0x8100_FFxx) answer with Apple's UID. The
//! OEM service (GET_MABS_OFFSET, boot-session UUID, WFK/KICK) is not
//! implemented, so its UID query gets NOT_SUPPORTED and XNU's
//! `hvg_is_hcall_available` concludes the OEM calls are absent.

use crate::psci::PsciError;
use crate::SysReg;

pub const PAC_SET_INITIAL_STATE: u32 = 0xc100_0000;
pub const PAC_GET_DEFAULT_KEYS: u32 = 0xc100_0001;
pub const PAC_SET_A_KEYS: u32 = 0xc100_0002;
pub const PAC_SET_B_KEYS: u32 = 0xc100_0003;
pub const PAC_SET_EL0_DIVERSIFIER: u32 = 0xc100_0004;
pub const PAC_SET_EL0_DIVERSIFIER_AT_EL1: u32 = 0xc100_0005;
pub const PAC_SET_G_KEY: u32 = 0xc100_0006;
pub const PAC_NOP: u32 = 0xc100_00f0;

/// 32-bit fast calls of the CPU service: UID, revision, features.
pub const CPU_UID: u32 = 0x8100_ff01;
pub const CPU_REVISION: u32 = 0x8100_ff03;
pub const CPU_FEATURES: u32 = 0x8100_feff;

/// `VMAPPLE_HVC_UID`.
pub const APPLE_UID: &str = "3B878185-AA62-4E1F-9DC9-D6799CBB6EBB";

pub const APIAKEYLO_EL1: SysReg = SysReg::new(3, 0, 2, 1, 0);
pub const APIAKEYHI_EL1: SysReg = SysReg::new(3, 0, 2, 1, 1);
pub const APIBKEYLO_EL1: SysReg = SysReg::new(3, 0, 2, 1, 2);
pub const APIBKEYHI_EL1: SysReg = SysReg::new(3, 0, 2, 1, 3);
pub const APDAKEYLO_EL1: SysReg = SysReg::new(3, 0, 2, 2, 0);
pub const APDAKEYHI_EL1: SysReg = SysReg::new(3, 0, 2, 2, 1);
pub const APDBKEYLO_EL1: SysReg = SysReg::new(3, 0, 2, 2, 2);
pub const APDBKEYHI_EL1: SysReg = SysReg::new(3, 0, 2, 2, 3);
pub const APGAKEYLO_EL1: SysReg = SysReg::new(3, 0, 2, 3, 0);
pub const APGAKEYHI_EL1: SysReg = SysReg::new(3, 0, 2, 3, 1);

/// The initial A key (low half); the other halves and the data key follow.
pub const DEFAULT_A_KEY: u64 = 0xfeed_face_feed_facf;
/// The initial EL0 diversifier GET_DEFAULT_KEYS reports.
pub const DEFAULT_EL0_KEY: u64 = 0xfeed_face_feed_fad3;
pub const DEFAULT_B_KEY: u64 = 0xfeed_face_feed_fad5;
pub const DEFAULT_G_KEY: u64 = 0xfeed_face_feed_fad9;

/// A pointer-authentication key: two registers, low and high half.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    Ia,
    Ib,
    Da,
    Db,
    Ga,
}

impl Key {
    /// The key's (low, high) registers.
    pub fn registers(self) -> (SysReg, SysReg) {
        match self {
            Key::Ia => (APIAKEYLO_EL1, APIAKEYHI_EL1),
            Key::Ib => (APIBKEYLO_EL1, APIBKEYHI_EL1),
            Key::Da => (APDAKEYLO_EL1, APDAKEYHI_EL1),
            Key::Db => (APDBKEYLO_EL1, APDBKEYHI_EL1),
            Key::Ga => (APGAKEYLO_EL1, APGAKEYHI_EL1),
        }
    }
}

/// Registers a hypercall's answer sets on the calling vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegisterWrites {
    /// New values of X0..X4 (`None`: unchanged).
    pub x: [Option<u64>; 5],
    /// Keys to load, in order: (key, low half, high half).
    pub keys: [Option<(Key, u64, u64)>; 5],
}

impl RegisterWrites {
    fn returning(x0: u64) -> Self {
        let mut w = Self::default();
        w.x[0] = Some(x0);
        w
    }

    /// Loads `key` with `value` (low half) and `value + 1` (high half), as
    /// the framework derives them.
    fn key(&mut self, key: Key, value: u64) {
        if let Some(slot) = self.keys.iter_mut().find(|s| s.is_none()) {
            *slot = Some((key, value, value.wrapping_add(1)));
        }
    }

    /// The system-register writes, in order.
    pub fn system_registers(&self) -> impl Iterator<Item = (SysReg, u64)> + '_ {
        self.keys.iter().flatten().flat_map(|&(key, lo, hi)| {
            let (lo_reg, hi_reg) = key.registers();
            [(lo_reg, lo), (hi_reg, hi)]
        })
    }
}

/// Whether `x0` names a call this module answers.
pub fn is_apple_call(x0: u64) -> bool {
    let fid = x0 as u32;
    fid & 0xff00_0000 == 0xc100_0000 || matches!(fid, CPU_UID | CPU_REVISION | CPU_FEATURES)
}

fn known_cpu_call(fid: u32) -> bool {
    matches!(fid, PAC_SET_INITIAL_STATE..=PAC_SET_G_KEY | PAC_NOP)
}

/// The UID as the four registers of a UID query: XNU's `regs_to_uuid`
/// reads byte j of register i as byte 15 - 4i - j of the UUID.
pub fn uid_registers(uid: &str) -> [u32; 4] {
    let hex: Vec<u8> = uid
        .bytes()
        .filter(u8::is_ascii_hexdigit)
        .map(|c| match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => c - b'A' + 10,
        })
        .collect();
    let mut bytes = [0u8; 16];
    for (i, pair) in hex.chunks(2).take(16).enumerate() {
        bytes[i] = (pair[0] << 4) | pair.get(1).copied().unwrap_or(0);
    }
    let mut regs = [0u32; 4];
    for (i, reg) in regs.iter_mut().enumerate() {
        for j in 0..4 {
            *reg |= u32::from(bytes[15 - i * 4 - j]) << (8 * j);
        }
    }
    regs
}

/// Answers the Apple call in `args` (x0..x3), as [`is_apple_call`] said.
pub fn dispatch(args: [u64; 4]) -> RegisterWrites {
    let fid = args[0] as u32;
    let not_supported = RegisterWrites::returning(PsciError::NotSupported.to_x0());
    if args[0] >> 32 != 0 && !matches!(fid, CPU_UID | CPU_REVISION | CPU_FEATURES) {
        // A 64-bit call's ID is 32 bits; anything above is not one of ours.
        return not_supported;
    }
    let mut w = RegisterWrites::returning(0);
    let x1 = args[1];
    match fid {
        PAC_SET_INITIAL_STATE => {
            w.key(Key::Ia, DEFAULT_A_KEY);
            w.key(Key::Da, DEFAULT_A_KEY.wrapping_add(2));
            w.key(Key::Ib, DEFAULT_B_KEY);
            w.key(Key::Db, DEFAULT_B_KEY.wrapping_add(2));
            w.key(Key::Ga, DEFAULT_G_KEY);
        }
        PAC_GET_DEFAULT_KEYS => {
            w.x[1] = Some(DEFAULT_A_KEY);
            w.x[2] = Some(DEFAULT_B_KEY);
            w.x[3] = Some(DEFAULT_EL0_KEY);
            w.x[4] = Some(DEFAULT_G_KEY);
        }
        PAC_SET_A_KEYS => {
            w.key(Key::Ia, x1);
            w.key(Key::Da, x1.wrapping_add(2));
        }
        PAC_SET_B_KEYS => {
            w.key(Key::Ib, x1);
            w.key(Key::Db, x1.wrapping_add(2));
        }
        PAC_SET_G_KEY => w.key(Key::Ga, x1),
        // APCTL/KERNKEY do not exist on the CPUs vmapple runs on.
        PAC_SET_EL0_DIVERSIFIER | PAC_SET_EL0_DIVERSIFIER_AT_EL1 | PAC_NOP => {}
        CPU_UID => {
            for (slot, reg) in w.x.iter_mut().zip(uid_registers(APPLE_UID)) {
                *slot = Some(u64::from(reg));
            }
        }
        CPU_REVISION => {
            w.x[1] = Some(0);
            w.x[0] = Some(1);
        }
        CPU_FEATURES => {
            if !known_cpu_call(x1 as u32) {
                return not_supported;
            }
        }
        _ => return not_supported,
    }
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sys(w: &RegisterWrites) -> Vec<(SysReg, u64)> {
        w.system_registers().collect()
    }

    #[test]
    fn initial_state_loads_every_key_and_returns_zero() {
        let w = dispatch([PAC_SET_INITIAL_STATE.into(), 0, 0, 0]);
        assert_eq!(w.x[0], Some(0));
        assert_eq!(
            sys(&w),
            [
                (APIAKEYLO_EL1, 0xfeed_face_feed_facf),
                (APIAKEYHI_EL1, 0xfeed_face_feed_fad0),
                (APDAKEYLO_EL1, 0xfeed_face_feed_fad1),
                (APDAKEYHI_EL1, 0xfeed_face_feed_fad2),
                (APIBKEYLO_EL1, 0xfeed_face_feed_fad5),
                (APIBKEYHI_EL1, 0xfeed_face_feed_fad6),
                (APDBKEYLO_EL1, 0xfeed_face_feed_fad7),
                (APDBKEYHI_EL1, 0xfeed_face_feed_fad8),
                (APGAKEYLO_EL1, 0xfeed_face_feed_fad9),
                (APGAKEYHI_EL1, 0xfeed_face_feed_fada),
            ]
        );
    }

    #[test]
    fn default_keys_come_back_in_x1_to_x4() {
        let w = dispatch([PAC_GET_DEFAULT_KEYS.into(), 0, 0, 0]);
        assert_eq!(
            w.x,
            [
                Some(0),
                Some(DEFAULT_A_KEY),
                Some(DEFAULT_B_KEY),
                Some(DEFAULT_EL0_KEY),
                Some(DEFAULT_G_KEY)
            ]
        );
        assert!(sys(&w).is_empty());
    }

    #[test]
    fn key_calls_derive_each_half_from_x1() {
        let w = dispatch([PAC_SET_B_KEYS.into(), 0x100, 0, 0]);
        assert_eq!(
            sys(&w),
            [
                (APIBKEYLO_EL1, 0x100),
                (APIBKEYHI_EL1, 0x101),
                (APDBKEYLO_EL1, 0x102),
                (APDBKEYHI_EL1, 0x103)
            ]
        );
        let w = dispatch([PAC_SET_A_KEYS.into(), u64::MAX, 0, 0]);
        assert_eq!(sys(&w)[1], (APIAKEYHI_EL1, 0), "wraps");
        let w = dispatch([PAC_SET_G_KEY.into(), 7, 0, 0]);
        assert_eq!(sys(&w), [(APGAKEYLO_EL1, 7), (APGAKEYHI_EL1, 8)]);
        for fid in [
            PAC_SET_EL0_DIVERSIFIER,
            PAC_SET_EL0_DIVERSIFIER_AT_EL1,
            PAC_NOP,
        ] {
            let w = dispatch([fid.into(), 1, 2, 0]);
            assert_eq!(w, RegisterWrites::returning(0), "{fid:#x}");
        }
    }

    #[test]
    fn unknown_calls_are_not_supported() {
        let minus_one = Some(u64::MAX);
        assert_eq!(dispatch([0xc100_0007, 0, 0, 0]).x[0], minus_one);
        assert_eq!(dispatch([0xc100_00f1, 0, 0, 0]).x[0], minus_one);
        assert_eq!(dispatch([0x1_c100_0000, 0, 0, 0]).x[0], minus_one);
        assert!(is_apple_call(0xc100_0006) && is_apple_call(0xc100_1234));
        assert!(!is_apple_call(0x8400_0000) && !is_apple_call(0xc300_0003));
    }

    #[test]
    fn discovery_names_apple_and_the_calls() {
        let w = dispatch([CPU_UID.into(), 0, 0, 0]);
        // What XNU's regs_to_uuid turns back into VMAPPLE_HVC_UID.
        assert_eq!(
            &w.x[..4],
            [
                Some(0x9cbb_6ebb),
                Some(0x9dc9_d679),
                Some(0xaa62_4e1f),
                Some(0x3b87_8185)
            ]
        );
        assert_eq!(
            dispatch([CPU_REVISION.into(), 0, 0, 0]).x[..2],
            [Some(1), Some(0)]
        );
        assert_eq!(
            dispatch([CPU_FEATURES.into(), PAC_NOP.into(), 0, 0]).x[0],
            Some(0)
        );
        assert_eq!(
            dispatch([CPU_FEATURES.into(), 0xc100_0042, 0, 0]).x[0],
            Some(u64::MAX)
        );
    }
}
