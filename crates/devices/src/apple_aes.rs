//! The Apple AES engine (`apple-aes`), vmapple-machine.md §10.
//!
//! The boot chain encrypts and decrypts NVRAM with it. Commands are pushed
//! word by word into a FIFO register of window 1 (`0x3022_0000`, 16 KiB);
//! every push retries the command at the head of the FIFO, and a command
//! that completes (DMA and cryptography included) does so inside that MMIO
//! write. Window 2 (`0x3023_0000`, 16 KiB) is inert. One level interrupt,
//! SPI 0x12, is high iff `IRQ_STATUS & IRQ_ENABLE` is non-zero, re-evaluated
//! after writes to `IRQ_STATUS`, `IRQ_ENABLE` and `FIFO` only (§10.5).
//! AES-128/192/256 in ECB and CBC come from RustCrypto's `aes`, `ecb` and
//! `cbc` crates.
//!
//! # Access rules (§10.2)
//!
//! Only naturally aligned 4- and 8-byte accesses do anything; 1- and
//! 2-byte or unaligned accesses are ignored with a guest error (loads
//! return 0). The engine works on 32-bit quantities: an 8-byte access at X
//! is a 4-byte access at X with bits 31:0 followed by one at X + 4 with
//! bits 63:32 (so a 64-bit store to `FIFO` pushes only its low word, quirk
//! Q5, and a 64-bit load at `IRQ_STATUS` returns `IRQ_ENABLE` in the high
//! half).
//!
//! # QEMU quirks, all reproduced
//!
//! * **Q2** IV slot = bit 27 ? 2 : 0 for IV and STORE_IV (bit 26 ignored,
//!   slots 1 and 3 unreachable); DATA always uses IV slot 0, and IV slots
//!   are not updated by a CBC operation.
//! * **Q3** Block mode and direction are device-wide, set by the latest KEY.
//! * **Q4** A failing command stays at the head of the FIFO and is retried
//!   on every push (an invalid opcode, a KEY with block mode 2/3 or a
//!   64-byte key wedges the FIFO for good); a full FIFO drops new words but
//!   still retries. Reset keeps the FIFO under
//!   [`FifoResetPolicy::QemuParity`] (the default) and empties it under
//!   [`FifoResetPolicy::ClearOnReset`].
//! * **Q5** See above.
//! * **Q6** `STATUS` reads the constant `0x3F80`, which never shows READY.
//! * **Q11** STORE_IV takes address bits 39:32 from its command word, DATA
//!   takes bits 47:32 of both addresses from payload word 1.
//!
//! # Deviations
//!
//! * DMA reaches only guest RAM (`vm_core::memory`): a DATA source or
//!   destination, or a STORE_IV destination, that is not wholly RAM fails
//!   the command (FIFO kept), where QEMU would also let it touch a device.
//!   Every precondition of DATA (both ranges, the key length, a length
//!   that is a multiple of 16) is checked before the buffer, at most
//!   [`MAX_DATA_LEN`] bytes, is allocated; a failure is invisible to the
//!   guest either way, so the order only changes which line is logged.
//! * Waiting for payload words is normal operation, so it is traced rather
//!   than reported as a guest error ("No payload" in QEMU's guest log).
//! * Reset deasserts the interrupt line, as §10.8 recommends.

use std::sync::{Arc, Mutex, MutexGuard};
use vm_core::sync::lock;

use aes::cipher::block_padding::NoPadding;
use aes::cipher::consts::U16;
use aes::cipher::{
    BlockCipher, BlockDecryptMut, BlockEncryptMut, BlockSizeUser, KeyInit, KeyIvInit,
};
use vm_core::memory::{range_is_ram, read_exact, write_all};
use vm_core::regs::{Narrow, RegisterFile, Wide};
use vm_core::{guest_error, AccessWidth, GuestRam, IrqLine, MmioDevice};

/// Guest physical base of window 1 (§2).
pub const WINDOW1_BASE: u64 = 0x3022_0000;
/// Guest physical base of window 2.
pub const WINDOW2_BASE: u64 = 0x3023_0000;
/// Size of each window.
pub const WINDOW_SIZE: u64 = 0x4000;
/// The engine's interrupt, an SPI number (§3).
pub const SPI: u32 = 0x12;

/// Window 1 register offsets (§10.3).
pub mod reg {
    pub const STATUS: u64 = 0x00C;
    pub const IRQ_STATUS: u64 = 0x018;
    pub const IRQ_ENABLE: u64 = 0x01C;
    pub const WATERMARK: u64 = 0x020;
    pub const Q_STATUS: u64 = 0x024;
    pub const FLAG_INFO: u64 = 0x030;
    pub const FIFO: u64 = 0x200;
}

/// `IRQ_STATUS` bits; no others are ever set.
pub mod irq {
    pub const INVALID_CMD: u32 = 1 << 2;
    pub const FLAG: u32 = 1 << 5;
}

/// Register values after reset (§10.8).
pub mod reset_value {
    /// Bits 7–13: both "DPA seeded" bits and five unnamed ones; not READY.
    pub const STATUS: u32 = 0x3F80;
    pub const Q_STATUS: u32 = 2;
}

/// Command opcodes, bits 31:28 of the head word (§10.6).
pub mod opcode {
    pub const SHIFT: u32 = 28;
    pub const KEY: u32 = 0x1;
    pub const IV: u32 = 0x2;
    pub const DSB: u32 = 0x3;
    pub const SKG: u32 = 0x4;
    pub const DATA: u32 = 0x5;
    pub const STORE_IV: u32 = 0x6;
    pub const WRITE_REG: u32 = 0x7;
    pub const FLAG: u32 = 0x8;
}

/// Command word fields (§10.7).
pub mod cmd {
    /// KEY: key slot.
    pub const KEY_SLOT_SHIFT: u32 = 27;
    /// KEY: 0 = payload key, 1–7 = built-in key.
    pub const KEY_SELECT_SHIFT: u32 = 24;
    pub const KEY_SELECT_MASK: u32 = 0x7;
    /// KEY: payload key length code (16, 24, 32, 64 bytes).
    pub const KEY_LEN_SHIFT: u32 = 22;
    pub const KEY_LEN_MASK: u32 = 0x3;
    pub const KEY_ENCRYPT: u32 = 1 << 20;
    pub const KEY_MODE_SHIFT: u32 = 16;
    pub const KEY_MODE_MASK: u32 = 0x3;
    /// IV and STORE_IV: the field QEMU decodes, bits 28:27, shifted right
    /// by 26 (quirk Q2).
    pub const IV_SLOT_MASK: u32 = 0x3 << 27;
    pub const IV_SLOT_SHIFT: u32 = 26;
    /// DATA: key slot.
    pub const DATA_KEY_SLOT_SHIFT: u32 = 27;
    /// DATA: byte count.
    pub const DATA_LEN_MASK: u32 = 0xFF_FFFF;
    /// STORE_IV: destination address bits 39:32.
    pub const STORE_IV_ADDR_HI_MASK: u32 = 0xFF;
    /// FLAG: set `IRQ_STATUS.FLAG`.
    pub const FLAG_RAISE: u32 = 1 << 27;
    /// FLAG: copied to `FLAG_INFO`.
    pub const FLAG_INFO_MASK: u32 = 0xFF;
}

/// Words the FIFO holds.
pub const FIFO_DEPTH: usize = 9;
/// Largest DATA length that can succeed (largest multiple of 16 < 2^24).
pub const MAX_DATA_LEN: usize = 0xFF_FFF0;
/// Key lengths by `KEY` length code.
pub const KEY_LENS: [usize; 4] = [16, 24, 32, 64];
/// Bytes a key slot holds.
pub const KEY_SLOT_BYTES: usize = 32;
/// Largest data dumped to the trace log (QEMU's `aes_dump_data`).
const DUMP_LIMIT: usize = 0x1000;

/// What a reset does to the FIFO (quirk Q4).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum FifoResetPolicy {
    /// Reset keeps the FIFO as QEMU does, so a wedged engine stays wedged.
    #[default]
    QemuParity,
    /// Reset empties the FIFO, unwedging the engine.
    ClearOnReset,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum BlockMode {
    Ecb,
    Cbc,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Key {
    len: usize,
    bytes: [u8; KEY_SLOT_BYTES],
}

/// Built-in key `select` (1–7): 1–3 are 32 bytes `select, 0, 0, …`; 4–7
/// are empty, so DATA with them fails "Invalid key length".
fn builtin_key(select: u32) -> Key {
    match u8::try_from(select) {
        Ok(select @ 1..=3) => {
            let mut bytes = [0u8; KEY_SLOT_BYTES];
            bytes[0] = select;
            Key { len: 32, bytes }
        }
        _ => Key::default(),
    }
}

#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct State {
    status: u32,
    q_status: u32,
    irq_status: u32,
    irq_enable: u32,
    watermark: u32,
    flag_info: u32,
    fifo: [u32; FIFO_DEPTH],
    fifo_len: usize,
    keys: [Key; 2],
    ivs: [[u8; 16]; 4],
    encrypt: bool,
    mode: BlockMode,
}

impl State {
    fn irq_level(&self) -> bool {
        self.irq_status & self.irq_enable != 0
    }

    fn has_payload(&self, words: usize) -> bool {
        self.fifo_len > words
    }

    /// Payload words 1..=n as bytes, least significant byte first.
    fn payload_bytes(&self, n: usize) -> Vec<u8> {
        self.fifo[1..=n]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect()
    }
}

/// Why a DATA command's cipher step failed.
#[derive(Debug)]
struct CipherError;

fn crypt_with<C>(
    mode: BlockMode,
    encrypt: bool,
    key: &[u8],
    iv: &[u8; 16],
    buf: &mut [u8],
) -> Result<(), CipherError>
where
    C: BlockCipher + BlockEncryptMut + BlockDecryptMut + KeyInit + BlockSizeUser<BlockSize = U16>,
{
    let len = buf.len();
    let done = match (mode, encrypt) {
        (BlockMode::Ecb, true) => ecb::Encryptor::<C>::new_from_slice(key)
            .map_err(|_| CipherError)?
            .encrypt_padded_mut::<NoPadding>(buf, len)
            .is_ok(),
        (BlockMode::Ecb, false) => ecb::Decryptor::<C>::new_from_slice(key)
            .map_err(|_| CipherError)?
            .decrypt_padded_mut::<NoPadding>(buf)
            .is_ok(),
        (BlockMode::Cbc, true) => cbc::Encryptor::<C>::new_from_slices(key, iv)
            .map_err(|_| CipherError)?
            .encrypt_padded_mut::<NoPadding>(buf, len)
            .is_ok(),
        (BlockMode::Cbc, false) => cbc::Decryptor::<C>::new_from_slices(key, iv)
            .map_err(|_| CipherError)?
            .decrypt_padded_mut::<NoPadding>(buf)
            .is_ok(),
    };
    if done {
        Ok(())
    } else {
        Err(CipherError)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The AES engine's state in a snapshot: registers, command FIFO, key and
/// IV slots.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct SavedAes(State);

/// The AES engine. Reach it through [`AppleAes::window1`] and
/// [`AppleAes::window2`].
pub struct AppleAes {
    memory: GuestRam,
    irq: Arc<dyn IrqLine>,
    fifo_policy: FifoResetPolicy,
    state: Mutex<State>,
}

impl AppleAes {
    /// A device in its reset state (QEMU resets devices before the guest
    /// runs, so power-on equals reset): key and IV slots zero, decrypt,
    /// ECB, FIFO empty.
    pub fn new(memory: GuestRam, irq: Arc<dyn IrqLine>, fifo_policy: FifoResetPolicy) -> Arc<Self> {
        let aes = Arc::new(Self {
            memory,
            irq,
            fifo_policy,
            state: Mutex::new(State {
                status: 0,
                q_status: 0,
                irq_status: 0,
                irq_enable: 0,
                watermark: 0,
                flag_info: 0,
                fifo: [0; FIFO_DEPTH],
                fifo_len: 0,
                keys: [Key::default(); 2],
                ivs: [[0; 16]; 4],
                encrypt: false,
                mode: BlockMode::Ecb,
            }),
        });
        aes.reset();
        aes
    }

    /// Registers, FIFO, keys and IVs, for a snapshot.
    pub fn save_state(&self) -> SavedAes {
        SavedAes(self.lock().clone())
    }

    /// Puts back what [`AppleAes::save_state`] returned and drives the
    /// interrupt line from it. Lengths beyond the FIFO or a key slot are
    /// refused.
    pub fn restore_state(&self, saved: SavedAes) -> Result<(), String> {
        let s = saved.0;
        if s.fifo_len > FIFO_DEPTH || s.keys.iter().any(|k| k.len > KEY_SLOT_BYTES) {
            return Err("FIFO or key length out of range".into());
        }
        let mut state = self.lock();
        *state = s;
        self.irq.set_level(state.irq_level());
        Ok(())
    }

    /// The FIFO policy this device was built with.
    pub fn fifo_policy(&self) -> FifoResetPolicy {
        self.fifo_policy
    }

    /// Window 1 (registers and FIFO), for the bus at [`WINDOW1_BASE`].
    pub fn window1(self: &Arc<Self>) -> Arc<dyn MmioDevice> {
        Arc::new(Window1(self.clone()))
    }

    /// Window 2 (inert), for the bus at [`WINDOW2_BASE`].
    pub fn window2(self: &Arc<Self>) -> Arc<dyn MmioDevice> {
        Arc::new(Window2)
    }

    /// System reset, hold phase (§10.8). FLAG_INFO, keys, IVs, mode and
    /// direction survive; the FIFO survives unless the policy clears it.
    pub fn reset(&self) {
        let mut s = self.lock();
        s.status = reset_value::STATUS;
        s.q_status = reset_value::Q_STATUS;
        s.irq_status = 0;
        s.irq_enable = 0;
        s.watermark = 0;
        if self.fifo_policy == FifoResetPolicy::ClearOnReset {
            s.fifo_len = 0;
        }
        self.irq.set_level(false);
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn read1(&self, offset: u64) -> u32 {
        let s = self.lock();
        let value = match offset {
            reg::STATUS => s.status,
            reg::IRQ_STATUS => s.irq_status,
            reg::IRQ_ENABLE => s.irq_enable,
            reg::WATERMARK => s.watermark,
            reg::Q_STATUS => s.q_status,
            reg::FLAG_INFO => s.flag_info,
            _ => {
                guest_error!("apple-aes: read of unimplemented offset {offset:#x}");
                0
            }
        };
        tracing::trace!(offset, value, "aes_read");
        value
    }

    fn write1(&self, offset: u64, value: u32) {
        tracing::trace!(offset, value, "aes_write");
        let mut s = self.lock();
        match offset {
            reg::IRQ_STATUS => s.irq_status &= !value,
            reg::IRQ_ENABLE => s.irq_enable = value,
            reg::FIFO => {
                if s.fifo_len < FIFO_DEPTH {
                    let at = s.fifo_len;
                    s.fifo[at] = value;
                    s.fifo_len += 1;
                } else {
                    guest_error!("apple-aes: FIFO full, word {value:#x} dropped");
                }
                self.process(&mut s);
            }
            _ => {
                guest_error!("apple-aes: write of {value:#x} to unimplemented offset {offset:#x}");
                return;
            }
        }
        self.irq.set_level(s.irq_level());
    }

    /// Tries the command at the head of the FIFO; empties the FIFO if it
    /// completed.
    fn process(&self, s: &mut State) {
        if s.fifo_len == 0 {
            return;
        }
        let op = s.fifo[0] >> opcode::SHIFT;
        let done = match op {
            opcode::KEY => self.cmd_key(s),
            opcode::IV => self.cmd_iv(s),
            opcode::DATA => self.cmd_data(s),
            opcode::STORE_IV => self.cmd_store_iv(s),
            opcode::FLAG => self.cmd_flag(s),
            _ => {
                guest_error!("apple-aes: invalid command {:#010x}", s.fifo[0]);
                s.irq_status |= irq::INVALID_CMD;
                false
            }
        };
        if done {
            s.fifo_len = 0;
        }
        tracing::trace!(op, done, "aes_fifo_process");
    }

    fn cmd_key(&self, s: &mut State) -> bool {
        let c = s.fifo[0];
        s.mode = match (c >> cmd::KEY_MODE_SHIFT) & cmd::KEY_MODE_MASK {
            0 => BlockMode::Ecb,
            1 => BlockMode::Cbc,
            m => {
                guest_error!("apple-aes: KEY with unsupported block mode {m}");
                return false;
            }
        };
        s.encrypt = c & cmd::KEY_ENCRYPT != 0;
        let slot = ((c >> cmd::KEY_SLOT_SHIFT) & 1) as usize;
        let select = (c >> cmd::KEY_SELECT_SHIFT) & cmd::KEY_SELECT_MASK;
        if select != 0 {
            tracing::trace!(slot, select, encrypt = s.encrypt, mode = ?s.mode, "aes_cmd_key_select_builtin");
            s.keys[slot] = builtin_key(select);
            return true;
        }
        let len = KEY_LENS[((c >> cmd::KEY_LEN_SHIFT) & cmd::KEY_LEN_MASK) as usize];
        tracing::trace!(slot, len, encrypt = s.encrypt, mode = ?s.mode, "aes_cmd_key_select_new");
        if len > KEY_SLOT_BYTES {
            guest_error!("apple-aes: KEY with unsupported {len}-byte key");
            return false;
        }
        if !s.has_payload(len / 4) {
            tracing::trace!("apple-aes: KEY waits for payload");
            return false;
        }
        let bytes = s.payload_bytes(len / 4);
        let key = &mut s.keys[slot];
        key.bytes = [0; KEY_SLOT_BYTES];
        key.bytes[..len].copy_from_slice(&bytes);
        key.len = len;
        true
    }

    fn iv_slot(c: u32) -> usize {
        ((c & cmd::IV_SLOT_MASK) >> cmd::IV_SLOT_SHIFT) as usize
    }

    fn cmd_iv(&self, s: &mut State) -> bool {
        if !s.has_payload(4) {
            return false;
        }
        let slot = Self::iv_slot(s.fifo[0]);
        let bytes = s.payload_bytes(4);
        let Some(iv) = s.ivs.get_mut(slot) else {
            // Unreachable for opcode 2 (bit 28 is clear), kept for safety.
            guest_error!("apple-aes: IV slot {slot} does not exist");
            return false;
        };
        iv.copy_from_slice(&bytes);
        tracing::trace!(slot, iv = %hex(iv), "aes_cmd_iv");
        true
    }

    fn cmd_data(&self, s: &mut State) -> bool {
        let c = s.fifo[0];
        let slot = ((c >> cmd::DATA_KEY_SLOT_SHIFT) & 1) as usize;
        let len = (c & cmd::DATA_LEN_MASK) as usize;
        let hi = u64::from(s.fifo[1]);
        let src = u64::from(s.fifo[2]) | ((hi << 16) & 0xFFFF_0000_0000);
        let dst = u64::from(s.fifo[3]) | ((hi << 32) & 0xFFFF_0000_0000);
        tracing::trace!(slot, iv_slot = 0, src, dst, len, "aes_cmd_data");
        if !s.has_payload(3) {
            tracing::trace!("apple-aes: DATA waits for payload");
            return false;
        }
        // A zero-length DMA always succeeds in QEMU, whatever the address.
        if len != 0 && !range_is_ram(&self.memory, src, len as u64) {
            guest_error!("apple-aes: DATA read of {len:#x} bytes at {src:#x} is not in RAM");
            return false;
        }
        let key = s.keys[slot];
        if !matches!(key.len, 16 | 24 | 32) {
            guest_error!("apple-aes: DATA with invalid key length {}", key.len);
            return false;
        }
        if len % 16 != 0 {
            if s.encrypt {
                guest_error!("apple-aes: Encryption failed (length {len:#x})");
            } else {
                guest_error!("apple-aes: Decryption failed (length {len:#x})");
            }
            return false;
        }
        if len != 0 && !range_is_ram(&self.memory, dst, len as u64) {
            // QEMU's message names the source address here by mistake.
            guest_error!("apple-aes: DATA write of {len:#x} bytes at {dst:#x} is not in RAM");
            return false;
        }
        if len == 0 {
            return true;
        }
        // len <= MAX_DATA_LEN (24-bit field, multiple of 16) and both
        // ranges are RAM: the allocation is bounded and the copies succeed.
        let mut buf = vec![0u8; len];
        if read_exact(&self.memory, src, &mut buf).is_err() {
            guest_error!("apple-aes: DATA read at {src:#x} failed");
            return false;
        }
        if len <= DUMP_LIMIT && tracing::enabled!(tracing::Level::TRACE) {
            tracing::trace!("aes_dump_data: cmd_data(): src_data={}", hex(&buf));
        }
        let iv = s.ivs[0];
        let key_bytes = &key.bytes[..key.len];
        let result = match key.len {
            16 => crypt_with::<aes::Aes128>(s.mode, s.encrypt, key_bytes, &iv, &mut buf),
            24 => crypt_with::<aes::Aes192>(s.mode, s.encrypt, key_bytes, &iv, &mut buf),
            _ => crypt_with::<aes::Aes256>(s.mode, s.encrypt, key_bytes, &iv, &mut buf),
        };
        if result.is_err() {
            guest_error!("apple-aes: cipher failed on {len:#x} bytes");
            return false;
        }
        if len <= DUMP_LIMIT && tracing::enabled!(tracing::Level::TRACE) {
            tracing::trace!("aes_dump_data: cmd_data(): dst_data={}", hex(&buf));
        }
        if write_all(&self.memory, dst, &buf).is_err() {
            guest_error!("apple-aes: DATA write at {dst:#x} failed");
            return false;
        }
        true
    }

    fn cmd_store_iv(&self, s: &mut State) -> bool {
        let c = s.fifo[0];
        if !s.has_payload(1) {
            tracing::trace!("apple-aes: STORE_IV waits for payload");
            return false;
        }
        let slot = Self::iv_slot(c);
        let Some(iv) = s.ivs.get(slot) else {
            guest_error!("apple-aes: STORE_IV Invalid context {slot}");
            return false;
        };
        let addr = u64::from(s.fifo[1]) | (u64::from(c & cmd::STORE_IV_ADDR_HI_MASK) << 32);
        if write_all(&self.memory, addr, iv).is_err() {
            guest_error!("apple-aes: STORE_IV write at {addr:#x} is not in RAM");
            return false;
        }
        tracing::trace!(slot, addr, iv = %hex(iv), "aes_cmd_store_iv");
        true
    }

    fn cmd_flag(&self, s: &mut State) -> bool {
        let c = s.fifo[0];
        let raise = c & cmd::FLAG_RAISE != 0;
        if raise {
            s.irq_status |= irq::FLAG;
        }
        s.flag_info = c & cmd::FLAG_INFO_MASK;
        tracing::trace!(raise, flag_info = s.flag_info, "aes_cmd_flag");
        true
    }

    #[cfg(test)]
    fn fifo_len(&self) -> usize {
        self.lock().fifo_len
    }
}

/// Both windows take aligned 32- and 64-bit accesses only (§10.2).
fn window(name: &'static str) -> RegisterFile<'static> {
    RegisterFile {
        name,
        size: WINDOW_SIZE,
        narrow: Narrow::Refused,
        wide: Wide::Split,
    }
}

struct Window1(Arc<AppleAes>);

impl MmioDevice for Window1 {
    fn read(&self, offset: u64, width: AccessWidth) -> u64 {
        window("apple-aes window 1").read(offset, width, |offset| self.0.read1(offset))
    }

    fn write(&self, offset: u64, width: AccessWidth, value: u64) {
        window("apple-aes window 1").write(offset, width, value, |offset, value| {
            self.0.write1(offset, value)
        })
    }
}

/// Window 2 has no state: it never reaches the engine.
struct Window2;

impl Window2 {
    fn read2(offset: u64) -> u32 {
        if offset != 0 {
            guest_error!("apple-aes window 2: read of unimplemented offset {offset:#x}");
        }
        tracing::trace!(offset, value = 0, "aes_2_read");
        0
    }

    fn write2(offset: u64, value: u32) {
        tracing::trace!(offset, value, "aes_2_write");
        guest_error!("apple-aes window 2: write of {value:#x} to unimplemented offset {offset:#x}");
    }
}

impl MmioDevice for Window2 {
    fn read(&self, offset: u64, width: AccessWidth) -> u64 {
        window("apple-aes window 2").read(offset, width, Self::read2)
    }

    fn write(&self, offset: u64, width: AccessWidth, value: u64) {
        window("apple-aes window 2").write(offset, width, value, Self::write2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_core::memory::create_guest_memory;
    use vm_core::TestIrq;
    use AccessWidth::{Byte, Double, Half, Word};

    const SRC: u64 = 0x7000_5000;
    const DST: u64 = 0x7000_6000;
    const RAM_END: u64 = 0x7010_0000;

    /// FIPS-197 appendix C plaintext.
    const PLAIN: [u8; 16] = [
        0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xAA, 0xBB, 0xCC, 0xDD, 0xEE,
        0xFF,
    ];
    /// §20.4 vector 38: CBC, built-in key 1, IV 00…0F, 32 zero bytes.
    const CBC_ZEROS: [u8; 32] = [
        0xf2, 0x25, 0x8e, 0x22, 0x5d, 0x79, 0x45, 0x72, 0x39, 0x3a, 0x64, 0x84, 0xcf, 0xce, 0xd7,
        0xcf, 0x0b, 0x65, 0x10, 0x53, 0xe1, 0x7b, 0x1a, 0x71, 0xa0, 0x0a, 0xfb, 0x4d, 0x26, 0x98,
        0xdb, 0x79,
    ];
    /// Words of the bytes 00…0F, least significant byte first.
    const WORDS_00_0F: [u32; 4] = [0x0302_0100, 0x0706_0504, 0x0B0A_0908, 0x0F0E_0D0C];

    struct Rig {
        mem: GuestRam,
        irq: Arc<TestIrq>,
        aes: Arc<AppleAes>,
        w1: Arc<dyn MmioDevice>,
        w2: Arc<dyn MmioDevice>,
    }

    impl Rig {
        fn with(policy: FifoResetPolicy) -> Self {
            // RAM for the §20.4 addresses: 0x7000_0000 (1 MiB), plus small
            // pieces above 4 GiB for the address-packing vectors.
            let mem = create_guest_memory(&[
                (0x7000_0000, 0x10_0000),
                (0x1_0000_0000, 0x1_0000),
                (0x1_2000_0000, 0x1000),
            ])
            .unwrap();
            let irq = Arc::new(TestIrq::new());
            let aes = AppleAes::new(mem.clone(), irq.clone(), policy);
            let w1 = aes.window1();
            let w2 = aes.window2();
            Self {
                mem,
                irq,
                aes,
                w1,
                w2,
            }
        }

        fn new() -> Self {
            Self::with(FifoResetPolicy::default())
        }

        fn r(&self, offset: u64) -> u32 {
            self.w1.read(offset, Word) as u32
        }

        fn w(&self, offset: u64, value: u32) {
            self.w1.write(offset, Word, u64::from(value));
        }

        fn push(&self, words: &[u32]) {
            for &word in words {
                self.w(reg::FIFO, word);
            }
        }

        fn poke(&self, addr: u64, bytes: &[u8]) {
            write_all(&self.mem, addr, bytes).unwrap();
        }

        fn peek(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            read_exact(&self.mem, addr, &mut v).unwrap();
            v
        }

        /// DATA of `len` bytes from [`SRC`] to [`DST`].
        fn data(&self, len: u32) {
            self.push(&[0x5000_0000 | len, 0, SRC as u32, DST as u32]);
        }

        fn flag_info(&self) -> u32 {
            self.r(reg::FLAG_INFO)
        }
    }

    fn bytes(hex: &str) -> Vec<u8> {
        hex.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    #[test]
    fn v33_reset_values() {
        let rig = Rig::new();
        assert_eq!(rig.r(reg::STATUS), 0x3F80);
        assert_eq!(rig.r(reg::Q_STATUS), 2);
        assert_eq!(rig.r(reg::IRQ_STATUS), 0);
        assert_eq!(rig.r(reg::IRQ_ENABLE), 0);
        assert_eq!(rig.r(reg::WATERMARK), 0);
        assert_eq!(rig.r(reg::FIFO), 0);
        assert_eq!(rig.r(0x4), 0);
        assert_eq!(rig.w2.read(0x0, Word), 0);
        assert_eq!(rig.w2.read(0x100, Word), 0);
        assert!(!rig.irq.is_asserted());
    }

    #[test]
    fn q6_status_and_watermark_ignore_writes() {
        let rig = Rig::new();
        rig.w(reg::STATUS, 0xFFFF_FFFF);
        rig.w(reg::WATERMARK, 0x1234);
        rig.w(reg::Q_STATUS, 0);
        rig.w(reg::FLAG_INFO, 0x55);
        assert_eq!(rig.r(reg::STATUS), 0x3F80);
        assert_eq!(rig.r(reg::STATUS) & (1 << 6), 0, "READY never set");
        assert_eq!(rig.r(reg::WATERMARK), 0);
        assert_eq!(rig.r(reg::Q_STATUS), 2);
        assert_eq!(rig.flag_info(), 0);
    }

    #[test]
    fn v34_flag_raises_interrupt() {
        let rig = Rig::new();
        rig.push(&[0x8800_00AB]);
        assert_eq!(rig.r(reg::IRQ_STATUS), 0x20);
        assert_eq!(rig.flag_info(), 0xAB);
        assert!(!rig.irq.is_asserted(), "masked");
        rig.w(reg::IRQ_ENABLE, 0x20);
        assert!(rig.irq.is_asserted());
        assert_eq!(rig.r(reg::IRQ_ENABLE), 0x20);
        rig.w(reg::IRQ_STATUS, 0x20);
        assert!(!rig.irq.is_asserted());
        assert_eq!(rig.r(reg::IRQ_STATUS), 0);
        assert_eq!(rig.irq.rising_edges(), 1);
    }

    #[test]
    fn irq_status_is_write_one_to_clear() {
        let rig = Rig::new();
        rig.push(&[0x8800_0000, 0x3000_0000]);
        assert_eq!(rig.r(reg::IRQ_STATUS), 0x24);
        rig.w(reg::IRQ_STATUS, 0x4);
        assert_eq!(rig.r(reg::IRQ_STATUS), 0x20);
        rig.w(reg::IRQ_STATUS, 0);
        assert_eq!(rig.r(reg::IRQ_STATUS), 0x20);
    }

    #[test]
    fn v35_flag_without_raise() {
        let rig = Rig::new();
        rig.push(&[0x8000_0012]);
        assert_eq!(rig.flag_info(), 0x12);
        assert_eq!(rig.r(reg::IRQ_STATUS), 0);
        rig.push(&[0x8C00_FF34]);
        assert_eq!(rig.flag_info(), 0x34, "stop bit and bits 25:8 ignored");
        assert_eq!(rig.r(reg::IRQ_STATUS), 0x20);
    }

    #[test]
    fn v36_ecb_builtin_keys() {
        let cases = [
            (
                0x1110_0000,
                "52 91 7f 3a e9 57 d5 23 0d 3a 2a f5 7c 7b 5a 71",
            ),
            (
                0x1210_0000,
                "1c 55 fb 81 1b 5c 64 64 c4 e5 de 15 35 a7 55 14",
            ),
            (
                0x1310_0000,
                "e3 b4 ac 4a da b8 8e d5 1d ba 9c 51 6c b2 c3 0b",
            ),
        ];
        for (key, want) in cases {
            let rig = Rig::new();
            rig.push(&[key]);
            rig.push(&[0x5000_0010, 0x0000_0000, 0x7000_5000, 0x7000_6000]);
            assert_eq!(rig.aes.fifo_len(), 0, "completed");
            assert_eq!(rig.peek(DST, 16), bytes(want), "key {key:#x}");
            assert_eq!(rig.r(reg::IRQ_STATUS), 0, "DATA raises no interrupt");
            assert!(!rig.irq.is_asserted());
        }
    }

    #[test]
    fn v37_custom_aes128_fips197() {
        let rig = Rig::new();
        rig.push(&[0x1010_0000]);
        rig.push(&WORDS_00_0F);
        rig.poke(SRC, &PLAIN);
        rig.data(16);
        assert_eq!(
            rig.peek(DST, 16),
            bytes("69 c4 e0 d8 6a 7b 04 30 d8 cd b7 80 70 b4 c5 5a")
        );
    }

    #[test]
    fn custom_aes192_and_aes256_fips197() {
        let key_words = |n: u32| -> Vec<u32> {
            (0..n)
                .map(|i| {
                    u32::from_le_bytes([
                        4 * i as u8,
                        4 * i as u8 + 1,
                        4 * i as u8 + 2,
                        4 * i as u8 + 3,
                    ])
                })
                .collect()
        };
        let cases = [
            (
                0x1050_0000,
                6,
                "dd a9 7c a4 86 4c df e0 6e af 70 a0 ec 0d 71 91",
            ),
            (
                0x1090_0000,
                8,
                "8e a2 b7 ca 51 67 45 bf ea fc 49 90 4b 49 60 89",
            ),
        ];
        for (key_cmd, words, want) in cases {
            let rig = Rig::new();
            rig.push(&[key_cmd]);
            rig.push(&key_words(words));
            assert_eq!(rig.aes.fifo_len(), 0);
            rig.poke(SRC, &PLAIN);
            rig.data(16);
            assert_eq!(rig.peek(DST, 16), bytes(want), "{key_cmd:#x}");
            // And back again in the other direction.
            rig.push(&[key_cmd & !cmd::KEY_ENCRYPT]);
            rig.push(&key_words(words));
            rig.push(&[0x5000_0010, 0, DST as u32, SRC as u32 + 0x100]);
            assert_eq!(rig.peek(SRC + 0x100, 16), PLAIN);
        }
    }

    #[test]
    fn v38_cbc_encrypt_no_chaining_then_decrypt() {
        let rig = Rig::new();
        rig.push(&[0x1111_0000, 0x2000_0000]);
        rig.push(&WORDS_00_0F);
        rig.data(32);
        assert_eq!(rig.peek(DST, 32), CBC_ZEROS);
        rig.poke(DST, &[0; 32]);
        rig.data(32);
        assert_eq!(rig.peek(DST, 32), CBC_ZEROS, "IV not chained");
        // STORE_IV shows slot 0 unchanged by the operation.
        rig.push(&[0x6000_0000, 0x7000_7000]);
        assert_eq!(rig.peek(0x7000_7000, 16), (0..16).collect::<Vec<u8>>());
        rig.push(&[0x1101_0000]);
        rig.poke(0x7000_8000, &[0xFF; 32]);
        rig.push(&[0x5000_0020, 0, DST as u32, 0x7000_8000]);
        assert_eq!(rig.peek(0x7000_8000, 32), [0; 32]);
    }

    #[test]
    fn ecb_decrypt_with_builtin_key() {
        let rig = Rig::new();
        rig.push(&[0x1100_0000]);
        rig.poke(
            SRC,
            &bytes("52 91 7f 3a e9 57 d5 23 0d 3a 2a f5 7c 7b 5a 71"),
        );
        rig.poke(DST, &[0xFF; 16]);
        rig.data(16);
        assert_eq!(rig.peek(DST, 16), [0; 16]);
    }

    #[test]
    fn q3_mode_and_direction_are_device_wide() {
        let rig = Rig::new();
        // Slot 1 gets key 2 in ECB encrypt; then slot 0 gets key 1 with CBC
        // decrypt, which also changes how slot 1 is used.
        rig.push(&[0x1A10_0000, 0x1101_0000]);
        rig.push(&[0x2000_0000, 0, 0, 0, 0]);
        rig.push(&[0x5800_0010, 0, SRC as u32, DST as u32]);
        let mut want = [0u8; 16];
        let key2 = {
            let mut k = [0u8; 32];
            k[0] = 2;
            k
        };
        crypt_with::<aes::Aes256>(BlockMode::Cbc, false, &key2, &[0; 16], &mut want).unwrap();
        assert_eq!(rig.peek(DST, 16), want);
        assert_ne!(
            rig.peek(DST, 16),
            bytes("1c 55 fb 81 1b 5c 64 64 c4 e5 de 15 35 a7 55 14"),
            "not the ECB-encrypt result slot 1 was loaded with"
        );
    }

    #[test]
    fn v39_q2_iv_slot_quirk() {
        let rig = Rig::new();
        rig.push(&[0x1111_0000, 0x2000_0000]);
        rig.push(&WORDS_00_0F);
        rig.push(&[
            0x2800_0000,
            0xF3F2_F1F0,
            0xF7F6_F5F4,
            0xFBFA_F9F8,
            0xFFFE_FDFC,
        ]);
        rig.data(32);
        assert_eq!(rig.peek(DST, 32), CBC_ZEROS, "DATA uses IV slot 0");
        rig.push(&[0x6800_0000, 0x7000_7000]);
        assert_eq!(
            rig.peek(0x7000_7000, 16),
            (0xF0..=0xFF).collect::<Vec<u8>>()
        );
        rig.push(&[0x6000_0000, 0x7000_7100]);
        assert_eq!(rig.peek(0x7000_7100, 16), (0..16).collect::<Vec<u8>>());
        // Bit 26 is ignored: 0x2400_0000 loads slot 0, 0x6C00_0000 reads slot 2.
        rig.push(&[
            0x2400_0000,
            0x1111_1111,
            0x1111_1111,
            0x1111_1111,
            0x1111_1111,
        ]);
        rig.push(&[0x6400_0000, 0x7000_7200]);
        assert_eq!(rig.peek(0x7000_7200, 16), [0x11; 16]);
        rig.push(&[0x6C00_0000, 0x7000_7300]);
        assert_eq!(
            rig.peek(0x7000_7300, 16),
            (0xF0..=0xFF).collect::<Vec<u8>>()
        );
    }

    #[test]
    fn v40_q11_store_iv_high_address_from_command() {
        let rig = Rig::new();
        rig.push(&[0x2000_0000]);
        rig.push(&WORDS_00_0F);
        rig.push(&[0x6000_0001, 0x2000_0000]);
        assert_eq!(rig.aes.fifo_len(), 0);
        assert_eq!(rig.peek(0x1_2000_0000, 16), (0..16).collect::<Vec<u8>>());
        // Bits 26:8 are not address bits.
        rig.push(&[0x6000_FF01, 0x2000_0010]);
        assert_eq!(rig.peek(0x1_2000_0010, 16), (0..16).collect::<Vec<u8>>());
    }

    #[test]
    fn v41_q11_data_address_packing() {
        let rig = Rig::new();
        rig.push(&[0x1110_0000]);
        rig.poke(0x1_0000_1000, &[0; 16]);
        rig.push(&[0x5000_0010, 0x0001_0001, 0x0000_1000, 0x0000_2000]);
        assert_eq!(
            rig.peek(0x1_0000_2000, 16),
            bytes("52 91 7f 3a e9 57 d5 23 0d 3a 2a f5 7c 7b 5a 71")
        );
        rig.push(&[0x5000_0010, 0x0001_0002, 0x0000_1000, 0x0000_2000]);
        assert_eq!(rig.aes.fifo_len(), 4, "DMA write failure keeps the FIFO");
        assert_eq!(rig.r(reg::IRQ_STATUS), 0);
    }

    #[test]
    fn v42_q4_invalid_opcode_wedges() {
        let rig = Rig::new();
        rig.push(&[0x3000_0000]);
        assert_eq!(rig.r(reg::IRQ_STATUS), irq::INVALID_CMD);
        rig.w(reg::IRQ_STATUS, irq::INVALID_CMD);
        assert_eq!(rig.r(reg::IRQ_STATUS), 0);
        rig.push(&[0x1234_5678]);
        assert_eq!(rig.r(reg::IRQ_STATUS), irq::INVALID_CMD, "re-dispatched");
        rig.w(reg::IRQ_STATUS, u32::MAX);
        rig.push(&[0x8000_0077]);
        assert_eq!(rig.flag_info(), 0, "FLAG behind the bad word never runs");
        rig.aes.reset();
        assert_eq!(rig.r(reg::IRQ_STATUS), 0);
        rig.push(&[0x8000_0077]);
        assert_eq!(
            rig.r(reg::IRQ_STATUS),
            irq::INVALID_CMD,
            "wedge survives reset"
        );
        assert_eq!(rig.flag_info(), 0);
        assert_eq!(rig.aes.fifo_policy(), FifoResetPolicy::QemuParity);
    }

    #[test]
    fn q4_clear_on_reset_policy_unwedges() {
        let rig = Rig::with(FifoResetPolicy::ClearOnReset);
        rig.push(&[0x0000_0000, 0x8000_0077]);
        assert_eq!(rig.flag_info(), 0);
        rig.aes.reset();
        rig.push(&[0x8000_0077]);
        assert_eq!(rig.flag_info(), 0x77);
        assert_eq!(rig.r(reg::IRQ_STATUS), 0);
    }

    #[test]
    fn v43_unaligned_length_retried() {
        let rig = Rig::new();
        rig.push(&[0x1110_0000]);
        rig.poke(DST, &[0xEE; 32]);
        rig.w(reg::IRQ_ENABLE, u32::MAX);
        rig.data(15);
        assert_eq!(rig.aes.fifo_len(), 4);
        assert_eq!(rig.peek(DST, 32), [0xEE; 32]);
        assert_eq!(rig.r(reg::IRQ_STATUS), 0);
        assert!(!rig.irq.is_asserted());
        rig.push(&[0x8800_0001]);
        assert_eq!(
            rig.aes.fifo_len(),
            5,
            "same DATA retried with one more word"
        );
        assert_eq!(rig.peek(DST, 32), [0xEE; 32]);
        assert_eq!(rig.flag_info(), 0);
    }

    #[test]
    fn v44_empty_builtin_key() {
        let rig = Rig::new();
        rig.push(&[0x1410_0000]);
        assert_eq!(rig.aes.fifo_len(), 0, "KEY itself succeeds");
        rig.poke(DST, &[0xEE; 16]);
        rig.data(16);
        assert_eq!(rig.aes.fifo_len(), 4);
        assert_eq!(rig.peek(DST, 16), [0xEE; 16]);
        for select in 5..=7u32 {
            let rig = Rig::new();
            rig.push(&[0x1010_0000 | (select << 24)]);
            rig.data(16);
            assert_eq!(rig.aes.fifo_len(), 4, "select {select}");
        }
    }

    #[test]
    fn v45_unsupported_block_mode_wedges_silently() {
        for key in [0x1012_0000, 0x1013_0000, 0x11D3_0000] {
            let rig = Rig::new();
            rig.push(&[key, 0x8000_0042]);
            assert_eq!(rig.aes.fifo_len(), 2);
            assert_eq!(rig.flag_info(), 0);
            assert_eq!(rig.r(reg::IRQ_STATUS), 0, "no INVALID_CMD");
        }
    }

    #[test]
    fn bad_block_mode_leaves_previous_mode() {
        // Mode 2 fails before direction or mode change (§10.7.1 step 1).
        let rig = Rig::new();
        rig.push(&[0x1110_0000]);
        let rig2 = Rig::new();
        rig2.push(&[0x1110_0000]);
        rig2.aes.lock().fifo_len = 0;
        rig2.push(&[0x1002_0000]);
        rig2.aes.lock().fifo_len = 0;
        rig2.data(16);
        rig.data(16);
        assert_eq!(rig2.peek(DST, 16), rig.peek(DST, 16));
    }

    #[test]
    fn sixty_four_byte_key_wedges() {
        let rig = Rig::new();
        rig.push(&[0x10D0_0000]);
        rig.push(&[0; 8]);
        assert_eq!(rig.aes.fifo_len(), 9);
        rig.push(&[0x8000_0001]);
        assert_eq!(rig.flag_info(), 0);
    }

    #[test]
    fn v46_key_waits_for_payload() {
        let rig = Rig::new();
        rig.push(&[0x1010_0000]);
        rig.push(&WORDS_00_0F[..3]);
        assert_eq!(rig.aes.fifo_len(), 4);
        // Slot 0 still holds no key: DATA would fail. Complete the key.
        rig.push(&WORDS_00_0F[3..]);
        assert_eq!(rig.aes.fifo_len(), 0);
        rig.poke(SRC, &PLAIN);
        rig.data(16);
        assert_eq!(
            rig.peek(DST, 16),
            bytes("69 c4 e0 d8 6a 7b 04 30 d8 cd b7 80 70 b4 c5 5a")
        );
    }

    #[test]
    fn payload_waits_for_iv_data_store_iv() {
        let rig = Rig::new();
        rig.push(&[0x2000_0000, 1, 2, 3]);
        assert_eq!(rig.aes.fifo_len(), 4);
        rig.push(&[4]);
        assert_eq!(rig.aes.fifo_len(), 0);
        rig.push(&[0x6000_0000]);
        assert_eq!(rig.aes.fifo_len(), 1);
        rig.push(&[0x7000_7000]);
        assert_eq!(rig.aes.fifo_len(), 0);
        assert_eq!(rig.peek(0x7000_7000, 4), [1, 0, 0, 0]);
        rig.push(&[0x1110_0000, 0x5000_0010, 0, SRC as u32]);
        assert_eq!(rig.aes.fifo_len(), 3);
        rig.push(&[DST as u32]);
        assert_eq!(rig.aes.fifo_len(), 0);
    }

    #[test]
    fn v47_q5_64bit_accesses_split() {
        let rig = Rig::new();
        rig.w1.write(reg::FIFO, Double, 0x8800_00CD_8800_00AB);
        assert_eq!(rig.flag_info(), 0xAB);
        assert_eq!(
            rig.aes.fifo_len(),
            0,
            "the high word went to 0x204, not the FIFO"
        );
        rig.w(reg::IRQ_ENABLE, 0x24);
        assert_eq!(rig.w1.read(reg::IRQ_STATUS, Double), (0x24u64 << 32) | 0x20);
        // A 64-bit store at IRQ_STATUS clears with the low word and writes
        // IRQ_ENABLE with the high word.
        rig.w1.write(reg::IRQ_STATUS, Double, 0x0000_0004_0000_0020);
        assert_eq!(rig.r(reg::IRQ_STATUS), 0);
        assert_eq!(rig.r(reg::IRQ_ENABLE), 4);
        assert_eq!(rig.w1.read(0x8, Double), 0x3F80u64 << 32);
    }

    #[test]
    fn v48_narrow_and_unaligned_accesses_do_nothing() {
        let rig = Rig::new();
        for w in [&rig.w1, &rig.w2] {
            for (offset, width) in [
                (reg::FIFO, Byte),
                (reg::FIFO, Half),
                (reg::FIFO + 2, Word),
                (reg::FIFO + 4, Double),
                (reg::IRQ_ENABLE, Byte),
                (reg::IRQ_ENABLE, Half),
            ] {
                w.write(offset, width, 0x8800_00AB);
            }
            assert_eq!(w.read(reg::STATUS, Byte), 0);
            assert_eq!(w.read(reg::STATUS, Half), 0);
            assert_eq!(w.read(reg::STATUS + 1, Word), 0);
            assert_eq!(w.read(reg::STATUS, Double), 0, "0xC is not 8-aligned");
        }
        assert_eq!(rig.flag_info(), 0);
        assert_eq!(rig.r(reg::IRQ_STATUS), 0);
        assert_eq!(rig.r(reg::IRQ_ENABLE), 0);
        assert_eq!(rig.aes.fifo_len(), 0);
    }

    #[test]
    fn window2_is_inert() {
        let rig = Rig::new();
        for offset in [0, 4, reg::FIFO, reg::IRQ_ENABLE, 0x3FFC] {
            rig.w2.write(offset, Word, 0x8800_00AB);
            assert_eq!(rig.w2.read(offset, Word), 0);
        }
        rig.w2.write(0x3FF8, Double, u64::MAX);
        assert_eq!(rig.w2.read(0x3FF8, Double), 0);
        assert_eq!(rig.flag_info(), 0);
        assert_eq!(rig.r(reg::IRQ_ENABLE), 0);
        assert_eq!(rig.aes.fifo_len(), 0);
    }

    #[test]
    fn reset_keeps_keys_flag_info_and_lowers_the_line() {
        let rig = Rig::new();
        rig.push(&[0x1110_0000, 0x8800_0099]);
        rig.w(reg::IRQ_ENABLE, 0x20);
        assert!(rig.irq.is_asserted());
        rig.aes.reset();
        assert!(!rig.irq.is_asserted());
        assert_eq!(rig.r(reg::IRQ_STATUS), 0);
        assert_eq!(rig.r(reg::IRQ_ENABLE), 0);
        assert_eq!(rig.flag_info(), 0x99, "FLAG_INFO survives");
        rig.data(16);
        assert_eq!(
            rig.peek(DST, 16),
            bytes("52 91 7f 3a e9 57 d5 23 0d 3a 2a f5 7c 7b 5a 71"),
            "key, mode and direction survive"
        );
    }

    #[test]
    fn zero_length_data_succeeds_anywhere_with_a_valid_key() {
        let rig = Rig::new();
        rig.push(&[0x5000_0000, 0, 0, 0]);
        assert_eq!(rig.aes.fifo_len(), 4, "no key yet: invalid key length");
        let rig = Rig::new();
        rig.push(&[0x1110_0000, 0x5000_0000, 0xFFFF_FFFF, 0, 0]);
        assert_eq!(rig.aes.fifo_len(), 0);
    }

    #[test]
    fn hostile_data_addresses() {
        let rig = Rig::new();
        rig.push(&[0x1110_0000]);
        let cases: [(u64, u64); 5] = [
            (SRC, WINDOW1_BASE + reg::FIFO), // destination is MMIO
            (WINDOW1_BASE, DST),             // source is MMIO
            (SRC, RAM_END - 8),              // destination straddles end of RAM
            (RAM_END - 8, DST),              // source straddles end of RAM
            (SRC, 0xFFFF_FFFF_FFF8),         // top of the 48-bit space
        ];
        for (src, dst) in cases {
            rig.poke(DST, &[0xEE; 16]);
            rig.aes.lock().fifo_len = 0;
            let hi = ((src >> 16) & 0xFFFF_0000) as u32 | (dst >> 32) as u32;
            rig.push(&[0x5000_0010, hi, src as u32, dst as u32]);
            assert_eq!(rig.aes.fifo_len(), 4, "{src:#x} -> {dst:#x}");
            assert_eq!(rig.peek(DST, 16), [0xEE; 16]);
            assert_eq!(rig.peek(RAM_END - 8, 8), [0; 8]);
        }
        // Maximum length from a source that is not RAM: refused before any
        // 16 MiB buffer exists.
        rig.aes.lock().fifo_len = 0;
        rig.push(&[0x50FF_FFF0, 0, SRC as u32, DST as u32]);
        assert_eq!(rig.aes.fifo_len(), 4);
        rig.aes.lock().fifo_len = 0;
        rig.push(&[0x50FF_FFFF, 0, SRC as u32, DST as u32]);
        assert_eq!(rig.aes.fifo_len(), 4);
    }

    #[test]
    fn largest_data_length_runs() {
        let mem = create_guest_memory(&[(0x4000_0000, 0x200_0000)]).unwrap();
        let aes = AppleAes::new(
            mem.clone(),
            Arc::new(TestIrq::new()),
            FifoResetPolicy::default(),
        );
        let w1 = aes.window1();
        for word in [0x1110_0000u32, 0x50FF_FFF0, 0, 0x4000_0000, 0x4100_0000] {
            w1.write(reg::FIFO, Word, u64::from(word));
        }
        assert_eq!(aes.fifo_len(), 0);
        let mut last = [0u8; 16];
        read_exact(&mem, 0x4100_0000 + MAX_DATA_LEN as u64 - 16, &mut last).unwrap();
        assert_eq!(
            last,
            bytes("52 91 7f 3a e9 57 d5 23 0d 3a 2a f5 7c 7b 5a 71")[..]
        );
    }

    #[test]
    fn store_iv_into_mmio_or_beyond_ram_is_retried() {
        let rig = Rig::new();
        for addr_hi in [0x00, 0xFF] {
            rig.aes.lock().fifo_len = 0;
            rig.push(&[0x6000_0000 | addr_hi, WINDOW1_BASE as u32]);
            assert_eq!(rig.aes.fifo_len(), 2);
            rig.push(&[0x8000_0001]);
            assert_eq!(rig.aes.fifo_len(), 3, "retried, still failing");
        }
        assert_eq!(rig.flag_info(), 0);
    }

    #[test]
    fn fifo_overflow_with_100_pushes() {
        let rig = Rig::new();
        rig.w(reg::IRQ_ENABLE, irq::INVALID_CMD);
        rig.push(&[0xF000_0000]);
        for i in 0..100u32 {
            rig.w(reg::IRQ_STATUS, u32::MAX);
            assert!(!rig.irq.is_asserted());
            rig.push(&[0x8000_0000 | i]);
            assert!(rig.irq.is_asserted(), "push {i} re-ran the bad word");
            assert_eq!(rig.aes.fifo_len(), (i as usize + 2).min(FIFO_DEPTH));
        }
        assert_eq!(rig.flag_info(), 0);
        // A DATA waiting on a bad source also stops at nine words.
        let rig = Rig::new();
        rig.push(&[0x1110_0000, 0x5000_0010, 0, 0x10, DST as u32]);
        for _ in 0..100 {
            rig.push(&[0x8800_0001]);
        }
        assert_eq!(rig.aes.fifo_len(), FIFO_DEPTH);
        assert_eq!(rig.r(reg::IRQ_STATUS), 0);
    }

    #[test]
    fn every_opcode_alone() {
        for op in 0..16u32 {
            let rig = Rig::new();
            rig.push(&[op << 28]);
            let invalid = rig.r(reg::IRQ_STATUS) & irq::INVALID_CMD != 0;
            let (want_invalid, want_len) = match op {
                // KEY select 0 (16-byte key) and IV, DATA, STORE_IV wait.
                1 | 2 | 5 | 6 => (false, 1),
                // FLAG without raise completes.
                8 => (false, 0),
                _ => (true, 1),
            };
            assert_eq!(invalid, want_invalid, "opcode {op}");
            assert_eq!(rig.aes.fifo_len(), want_len, "opcode {op}");
            assert_eq!(rig.r(reg::IRQ_STATUS) & irq::FLAG, 0);
        }
    }
}
