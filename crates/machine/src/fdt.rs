//! The device tree handed to a directly booted Linux kernel.
//!
//! Apple's boot ROM carries its own knowledge of the board, so the vmapple
//! machine has no device tree. To prove devices against drivers we did not
//! write, Linux is booted directly, and it needs this description of the
//! same hardware: what it says must match `layout` exactly.

use vm_fdt::{FdtWriter, FdtWriterResult};

use crate::layout::*;

const PHANDLE_GIC: u32 = 1;
const PHANDLE_APB_CLOCK: u32 = 2;
const PHANDLE_GPIO: u32 = 3;

/// Interrupt specifier cells for the GICv3 binding.
const GIC_SPI: u32 = 0;
const GIC_PPI: u32 = 1;
const IRQ_TYPE_LEVEL_HIGH: u32 = 4;

/// The clock the PL011 and other PrimeCells are fed.
const APB_CLOCK_HZ: u32 = 24_000_000;

/// What the tree describes beyond the fixed board.
#[derive(Clone, Debug, Default)]
pub struct FdtParams {
    pub cpus: usize,
    pub ram_size: u64,
    pub cmdline: String,
    pub initrd: Option<(u64, u64)>,
    /// Entropy for the kernel's RNG and KASLR.
    pub rng_seed: [u8; 32],
    /// Devices present besides GIC, timer and UART.
    pub rtc: bool,
    pub gpio_power_key: bool,
    /// The PCIe host (§7), given as its `interrupt-map` cells (from
    /// [`pci::PciHost::interrupt_map_cells`]); `None` leaves it out.
    pub pci_interrupt_map: Option<Vec<u32>>,
    /// INTIDs the GIC raises on message writes (`--msi on`): the GIC node
    /// becomes an `msi-controller` with these `mbi-ranges` (Linux writes
    /// GICD_SETSPI_NSR), and the PCIe host's `msi-parent`.
    pub message_intids: Option<std::ops::Range<u32>>,
}

/// The GIC node's `#address-cells` (absent, so 0): the parent unit
/// address in each `interrupt-map` entry is empty.
pub const GIC_ADDRESS_CELLS: u32 = 0;
/// The GIC's phandle, for building `interrupt-map` cells.
pub const GIC_PHANDLE: u32 = PHANDLE_GIC;

fn node_name(kind: &str, base: u64) -> String {
    format!("{kind}@{base:x}")
}

/// Builds the flattened device tree blob.
pub fn build(p: &FdtParams) -> FdtWriterResult<Vec<u8>> {
    let mut fdt = FdtWriter::new()?;
    let root = fdt.begin_node("")?;
    fdt.property_string("compatible", "vmapple,vmapple")?;
    fdt.property_string("model", "vmapple")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_u32("interrupt-parent", PHANDLE_GIC)?;

    let chosen = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", &p.cmdline)?;
    fdt.property_string(
        "stdout-path",
        &format!("/{}", node_name("pl011", UART_BASE)),
    )?;
    if let Some((start, end)) = p.initrd {
        fdt.property_u64("linux,initrd-start", start)?;
        fdt.property_u64("linux,initrd-end", end)?;
    }
    fdt.property("rng-seed", &p.rng_seed)?;
    fdt.property_u64(
        "kaslr-seed",
        u64::from_le_bytes(p.rng_seed[..8].try_into().expect("8 bytes")),
    )?;
    fdt.end_node(chosen)?;

    let memory = fdt.begin_node(&node_name("memory", RAM_BASE))?;
    fdt.property_string("device_type", "memory")?;
    fdt.property_array_u64("reg", &[RAM_BASE, p.ram_size])?;
    fdt.end_node(memory)?;

    let cpus = fdt.begin_node("cpus")?;
    fdt.property_u32("#address-cells", 1)?;
    fdt.property_u32("#size-cells", 0)?;
    for i in 0..p.cpus {
        let affinity = arch_arm64::Mpidr::for_cpu(i).affinity() as u32;
        let cpu = fdt.begin_node(&format!("cpu@{affinity:x}"))?;
        fdt.property_string("device_type", "cpu")?;
        fdt.property_string("compatible", "arm,arm-v8")?;
        fdt.property_u32("reg", affinity)?;
        fdt.property_string("enable-method", "psci")?;
        fdt.end_node(cpu)?;
    }
    fdt.end_node(cpus)?;

    let psci = fdt.begin_node("psci")?;
    fdt.property_string_list(
        "compatible",
        vec![
            "arm,psci-1.0".into(),
            "arm,psci-0.2".into(),
            "arm,psci".into(),
        ],
    )?;
    fdt.property_string("method", "hvc")?;
    fdt.end_node(psci)?;

    let gic = fdt.begin_node(&node_name("interrupt-controller", GICD_BASE))?;
    fdt.property_string("compatible", "arm,gic-v3")?;
    fdt.property_u32("#interrupt-cells", 3)?;
    fdt.property_null("interrupt-controller")?;
    let redistributors = p.cpus as u64 * gic::GicV3::REDIST_STRIDE;
    fdt.property_array_u64("reg", &[GICD_BASE, GICD_SIZE, GICR_BASE, redistributors])?;
    fdt.property_phandle(PHANDLE_GIC)?;
    if let Some(intids) = &p.message_intids {
        fdt.property_null("msi-controller")?;
        fdt.property_array_u32("mbi-ranges", &[intids.start, intids.len() as u32])?;
    }
    fdt.end_node(gic)?;

    // Secure physical, non-secure physical, virtual, hypervisor: only the
    // virtual timer (PPI 11 = INTID 27) is wired on vmapple, and it is the
    // one a kernel at EL1 uses.
    let timer = fdt.begin_node("timer")?;
    fdt.property_string("compatible", "arm,armv8-timer")?;
    let mut cells = Vec::new();
    for ppi in [13u32, 14, 11, 10] {
        cells.extend_from_slice(&[GIC_PPI, ppi, IRQ_TYPE_LEVEL_HIGH]);
    }
    fdt.property_array_u32("interrupts", &cells)?;
    fdt.property_null("always-on")?;
    fdt.end_node(timer)?;

    let clock = fdt.begin_node("apb-pclk")?;
    fdt.property_string("compatible", "fixed-clock")?;
    fdt.property_u32("#clock-cells", 0)?;
    fdt.property_u32("clock-frequency", APB_CLOCK_HZ)?;
    fdt.property_string("clock-output-names", "clk24mhz")?;
    fdt.property_phandle(PHANDLE_APB_CLOCK)?;
    fdt.end_node(clock)?;

    primecell(
        &mut fdt,
        "pl011",
        "arm,pl011",
        UART_BASE,
        0x1000,
        SPI_UART,
        &["uartclk", "apb_pclk"],
    )?;
    if p.rtc {
        primecell(
            &mut fdt,
            "pl031",
            "arm,pl031",
            RTC_BASE,
            RTC_SIZE,
            SPI_RTC,
            &["apb_pclk"],
        )?;
    }
    if p.gpio_power_key {
        let gpio = fdt.begin_node(&node_name("pl061", GPIO_BASE))?;
        fdt.property_string_list(
            "compatible",
            vec!["arm,pl061".into(), "arm,primecell".into()],
        )?;
        fdt.property_array_u64("reg", &[GPIO_BASE, GPIO_SIZE])?;
        fdt.property_array_u32("interrupts", &[GIC_SPI, SPI_GPIO, IRQ_TYPE_LEVEL_HIGH])?;
        fdt.property_u32("#gpio-cells", 2)?;
        fdt.property_null("gpio-controller")?;
        fdt.property_array_u32("clocks", &[PHANDLE_APB_CLOCK])?;
        fdt.property_string("clock-names", "apb_pclk")?;
        fdt.property_phandle(PHANDLE_GPIO)?;
        fdt.end_node(gpio)?;

        // The power button on line 3 (§13.3): Linux's gpio-keys turns its
        // rising edge into KEY_POWER, which init can act on.
        let keys = fdt.begin_node("gpio-keys")?;
        fdt.property_string("compatible", "gpio-keys")?;
        let key = fdt.begin_node("poweroff")?;
        fdt.property_string("label", "GPIO Key Poweroff")?;
        fdt.property_u32("linux,code", 116)?; // KEY_POWER
                                              // <controller, line 3, active high>
        fdt.property_array_u32("gpios", &[PHANDLE_GPIO, 3, 0])?;
        fdt.end_node(key)?;
        fdt.end_node(keys)?;
    }

    if let Some(map) = &p.pci_interrupt_map {
        pci_host(&mut fdt, map, p.message_intids.is_some())?;
    }

    fdt.end_node(root)?;
    fdt.finish()
}

/// A `pci-host-ecam-generic` node: Linux enumerates the bus and assigns
/// BARs itself inside the window, and takes INTx from the interrupt map,
/// which spells out 16 slots and 4 pins because 16 lines do not fit the
/// usual 4-line mask.
fn pci_host(fdt: &mut FdtWriter, interrupt_map: &[u32], msi: bool) -> FdtWriterResult<()> {
    let node = fdt.begin_node(&node_name("pcie", PCIE_ECAM_BASE))?;
    fdt.property_string("compatible", "pci-host-ecam-generic")?;
    fdt.property_string("device_type", "pci")?;
    fdt.property_array_u64("reg", &pci::host::FDT_REG)?;
    fdt.property_array_u32("bus-range", &pci::host::FDT_BUS_RANGE)?;
    fdt.property_u32("#address-cells", 3)?;
    fdt.property_u32("#size-cells", 2)?;
    fdt.property_u32("#interrupt-cells", 1)?;
    fdt.property_u32("linux,pci-domain", 0)?;
    fdt.property_null("dma-coherent")?;
    fdt.property_array_u32("ranges", &pci::host::FDT_RANGES)?;
    fdt.property_array_u32("interrupt-map-mask", &pci::host::INTERRUPT_MAP_MASK)?;
    fdt.property_array_u32("interrupt-map", interrupt_map)?;
    if msi {
        fdt.property_u32("msi-parent", PHANDLE_GIC)?;
    }
    fdt.end_node(node)
}

fn primecell(
    fdt: &mut FdtWriter,
    kind: &str,
    compatible: &str,
    base: u64,
    size: u64,
    spi: u32,
    clock_names: &[&str],
) -> FdtWriterResult<()> {
    let node = fdt.begin_node(&node_name(kind, base))?;
    fdt.property_string_list(
        "compatible",
        vec![compatible.into(), "arm,primecell".into()],
    )?;
    fdt.property_array_u64("reg", &[base, size])?;
    fdt.property_array_u32("interrupts", &[GIC_SPI, spi, IRQ_TYPE_LEVEL_HIGH])?;
    fdt.property_array_u32("clocks", &vec![PHANDLE_APB_CLOCK; clock_names.len()])?;
    fdt.property_string_list(
        "clock-names",
        clock_names.iter().map(|s| s.to_string()).collect(),
    )?;
    fdt.end_node(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_a_valid_blob() {
        let blob = build(&FdtParams {
            cpus: 2,
            ram_size: 512 << 20,
            cmdline: "console=ttyAMA0".into(),
            initrd: Some((0x7800_0000, 0x7810_0000)),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(&blob[..4], &[0xd0, 0x0d, 0xfe, 0xed], "FDT magic");
        let text = String::from_utf8_lossy(&blob);
        for needle in [
            "cpu@1",
            "arm,gic-v3",
            "pl011@20010000",
            "console=ttyAMA0",
            "linux,initrd-start",
        ] {
            assert!(text.contains(needle), "missing {needle}");
        }
        assert!(!text.contains("pl031"), "absent devices are not described");
        assert!(!text.contains("pci-host-ecam-generic"));
    }

    #[test]
    fn pci_host_node_is_present_when_asked_for() {
        let blob = build(&FdtParams {
            cpus: 1,
            ram_size: 256 << 20,
            pci_interrupt_map: Some(vec![0; 8]),
            ..Default::default()
        })
        .unwrap();
        let text = String::from_utf8_lossy(&blob);
        assert!(text.contains("pci-host-ecam-generic"));
        assert!(text.contains("pcie@40000000"));
    }

    #[test]
    fn msi_makes_the_gic_an_msi_controller_and_the_host_its_child() {
        let params = FdtParams {
            cpus: 1,
            ram_size: 256 << 20,
            pci_interrupt_map: Some(vec![0; 8]),
            ..Default::default()
        };
        let without = String::from_utf8_lossy(&build(&params).unwrap()).into_owned();
        assert!(!without.contains("msi-controller") && !without.contains("msi-parent"));
        let blob = build(&FdtParams {
            message_intids: Some(0xa0..0x120),
            ..params
        })
        .unwrap();
        let text = String::from_utf8_lossy(&blob);
        assert!(text.contains("msi-controller") && text.contains("msi-parent"));
        // mbi-ranges = <0xa0 0x80>, big-endian cells.
        let cells = [0, 0, 0, 0xa0, 0, 0, 0, 0x80];
        assert!(blob.windows(8).any(|w| w == cells), "mbi-ranges");
    }
}
