//! `vmapple inspect-ipsw`: Apple's device tree for the virtual Mac board
//! next to vmapple's memory and interrupt map.
//!
//! An IPSW carries the board's device tree as an IMG4 payload (`IM4P`, a
//! DER sequence of "IM4P", a type, a description and the payload). The
//! payload is Apple's flattened device tree: a node is two little-endian
//! u32 (property count, child count), its properties, then its children;
//! a property is a 32-byte NUL-padded name, a u32 length (bit 31 flags a
//! placeholder the boot loader fills in) and the value padded to 4 bytes.
//! Device addresses under `arm-io` are translated through its `ranges`
//! (child address, parent address, size), as the published analysis of
//! the VirtualMac2,1 tree does (`avp-rtc` reg 0x2024_0000 + 0x1000_0000 =
//! 0x3024_0000; aquarat/experiment-macos-arm64-on-asahi-linux-arm64,
//! docs/NOTES.md). Interrupts are GIC INTIDs (SPI + 32).
//!
//! Every length and count in the file is checked against what is left of
//! it: a hostile file gives an error, never a panic or a large allocation.

use std::fmt::Write as _;

use crate::layout;

/// Nodes deeper than this are refused (the real tree is a few levels).
const MAX_DEPTH: usize = 16;
/// Largest file read.
pub const MAX_FILE: u64 = 64 << 20;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AdtError {
    #[error("the file ends inside {0}")]
    Truncated(&'static str),
    #[error("nodes nest deeper than {MAX_DEPTH} levels")]
    TooDeep,
    #[error("{0} bytes follow the root node")]
    Trailing(usize),
    #[error("the IMG4 payload is compressed ({0}); extract it first (e.g. `ipsw img4 extract`)")]
    Compressed(&'static str),
    #[error("this is a zip archive (an IPSW): extract its DeviceTree .im4p first")]
    Zip,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Property {
    pub name: String,
    pub value: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Node {
    pub properties: Vec<Property>,
    pub children: Vec<Node>,
}

impl Node {
    pub fn property(&self, name: &str) -> Option<&[u8]> {
        self.properties
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.value.as_slice())
    }

    pub fn name(&self) -> String {
        self.property("name").map(c_string).unwrap_or_default()
    }

    fn compatible(&self) -> Vec<String> {
        self.property("compatible")
            .map(|v| {
                v.split(|&b| b == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| String::from_utf8_lossy(s).into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn cells(&self, name: &str, default: usize) -> usize {
        self.property(name)
            .and_then(|v| v.get(..4))
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .filter(|&c| c == 1 || c == 2)
            .unwrap_or(default)
    }
}

impl Node {
    /// A node with `properties` (name, value) and `children`.
    pub fn new(properties: &[(&str, &[u8])], children: Vec<Node>) -> Node {
        Node {
            properties: properties
                .iter()
                .map(|&(name, value)| Property {
                    name: name.to_owned(),
                    value: value.to_vec(),
                })
                .collect(),
            children,
        }
    }

    /// The node in Apple's flattened format, as [`parse`] reads it (fuzz
    /// seeds and tests build trees with it).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write(&mut out);
        out
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.extend((self.properties.len() as u32).to_le_bytes());
        out.extend((self.children.len() as u32).to_le_bytes());
        for p in &self.properties {
            let mut name = [0u8; 32];
            // A name fills its 32 bytes, NUL-terminated when shorter.
            let len = p.name.len().min(32);
            name[..len].copy_from_slice(&p.name.as_bytes()[..len]);
            out.extend(name);
            out.extend((p.value.len() as u32).to_le_bytes());
            out.extend(&p.value);
            out.resize(out.len().next_multiple_of(4), 0);
        }
        for c in &self.children {
            c.write(out);
        }
    }
}

fn c_string(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], AdtError> {
        let end = self.at.checked_add(n).ok_or(AdtError::Truncated(what))?;
        let bytes = self
            .data
            .get(self.at..end)
            .ok_or(AdtError::Truncated(what))?;
        self.at = end;
        Ok(bytes)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, AdtError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn node(&mut self, depth: usize) -> Result<Node, AdtError> {
        if depth > MAX_DEPTH {
            return Err(AdtError::TooDeep);
        }
        let properties = self.u32("a node header")?;
        let children = self.u32("a node header")?;
        let mut node = Node::default();
        for _ in 0..properties {
            let name = c_string(self.take(32, "a property name")?);
            let len = (self.u32("a property length")? & 0x7fff_ffff) as usize;
            let value = self.take(len, "a property value")?.to_vec();
            let pad = (4 - len % 4) % 4;
            self.take(pad, "a property's padding")?;
            node.properties.push(Property { name, value });
        }
        for _ in 0..children {
            node.children.push(self.node(depth + 1)?);
        }
        Ok(node)
    }
}

/// Parses a flattened device tree.
pub fn parse(data: &[u8]) -> Result<Node, AdtError> {
    let mut r = Reader { data, at: 0 };
    let root = r.node(0)?;
    let rest = data.len() - r.at;
    // Boot loaders pad the blob; only non-zero bytes are suspicious.
    if data[r.at..].iter().any(|&b| b != 0) {
        return Err(AdtError::Trailing(rest));
    }
    Ok(root)
}

/// One DER element: (tag, contents), advancing `at`.
fn der<'a>(data: &'a [u8], at: &mut usize) -> Option<(u8, &'a [u8])> {
    let tag = *data.get(*at)?;
    let first = *data.get(*at + 1)?;
    let (len, header) = if first < 0x80 {
        (usize::from(first), 2)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 {
            return None;
        }
        let bytes = data.get(*at + 2..*at + 2 + n)?;
        (
            bytes
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | usize::from(b)),
            2 + n,
        )
    };
    let start = *at + header;
    let contents = data.get(start..start.checked_add(len)?)?;
    *at = start + len;
    Some((tag, contents))
}

/// The device tree inside `file`: an IM4P's payload, or the file itself.
pub fn device_tree_bytes(file: &[u8]) -> Result<&[u8], AdtError> {
    if file.starts_with(b"PK\x03\x04") {
        return Err(AdtError::Zip);
    }
    let mut at = 0;
    if let Some((0x30, body)) = der(file, &mut at) {
        let mut i = 0;
        if let Some((0x16, b"IM4P")) = der(body, &mut i) {
            let _kind = der(body, &mut i);
            let _description = der(body, &mut i);
            if let Some((0x04, payload)) = der(body, &mut i) {
                if payload.starts_with(b"bvx") {
                    return Err(AdtError::Compressed("LZFSE"));
                }
                return Ok(payload);
            }
            return Err(AdtError::Truncated("the IM4P payload"));
        }
    }
    Ok(file)
}

/// One DER element: `tag`, its length (short or long form), `contents`.
fn der_element(tag: u8, contents: &[u8]) -> Vec<u8> {
    let len = contents.len();
    let mut out = vec![tag];
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|&&b| b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend(&bytes[skip..]);
    }
    out.extend(contents);
    out
}

/// `payload` as an IMG4 payload of type `kind` (`dtre` for a device
/// tree), as an IPSW carries it: what [`device_tree_bytes`] unwraps.
pub fn im4p(kind: &str, description: &str, payload: &[u8]) -> Vec<u8> {
    let body = [
        der_element(0x16, b"IM4P"),
        der_element(0x16, kind.as_bytes()),
        der_element(0x16, description.as_bytes()),
        der_element(0x04, payload),
    ]
    .concat();
    der_element(0x30, &body)
}

/// Where vmapple puts the device Apple's tree describes with `compatible`.
fn vmapple_place(compatible: &[String], name: &str) -> Option<(&'static str, u64, Option<u32>)> {
    let has = |needle: &str| compatible.iter().any(|c| c.contains(needle));
    Some(if has("avp,rtc") {
        ("avp-rtc", layout::AVP_RTC_BASE, Some(layout::SPI_AVP_RTC))
    } else if has("pl031") {
        ("pl031", layout::RTC_BASE, Some(layout::SPI_RTC))
    } else if has("pl061") {
        ("pl061", layout::GPIO_BASE, Some(layout::SPI_GPIO))
    } else if has("gicv3") {
        ("gic", layout::GICD_BASE, None)
    } else if has("paravirtualizedgraphics") {
        ("apple-gfx", layout::GFX_BASE, Some(layout::SPI_GFX))
    } else if has("pcie") {
        ("pcie-host", layout::PCIE_ECAM_BASE, None)
    } else if name.starts_with("uart") || has("uart") {
        ("pl011", layout::UART_BASE, Some(layout::SPI_UART))
    } else {
        return None;
    })
}

fn read_cells(bytes: &[u8], cells: usize) -> Option<u64> {
    match cells {
        1 => Some(u64::from(u32::from_le_bytes(
            bytes.get(..4)?.try_into().ok()?,
        ))),
        _ => Some(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)),
    }
}

/// (child base, parent base, size) triples of a bus's `ranges`.
fn ranges(bus: &Node) -> Vec<(u64, u64, u64)> {
    let cells = bus.cells("#address-cells", 2);
    let size_cells = bus.cells("#size-cells", 2);
    let step = 4 * (2 * cells + size_cells);
    bus.property("ranges")
        .map(|v| {
            v.chunks_exact(step)
                .filter_map(|c| {
                    Some((
                        read_cells(c, cells)?,
                        read_cells(&c[4 * cells..], cells)?,
                        read_cells(&c[8 * cells..], size_cells)?,
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn translate(address: u64, ranges: &[(u64, u64, u64)]) -> u64 {
    ranges
        .iter()
        .find(|&&(child, _, size)| address >= child && address - child < size)
        .map_or(address, |&(child, parent, _)| {
            // A file's ranges may point past the address space; the report
            // shows the wrapped value rather than trusting them.
            parent.wrapping_add(address - child)
        })
}

/// The report: each node with a `reg` under the root or `arm-io`, where
/// Apple's tree puts it and where vmapple does.
pub fn report(root: &Node) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<24} {:<28} {:>12} {:>10} {:>14}   vmapple",
        "node", "compatible", "address", "size", "interrupts"
    );
    let mut visit = |node: &Node, path: &str, bus: &Node| {
        let Some(reg) = node.property("reg") else {
            return;
        };
        let cells = bus.cells("#address-cells", 2);
        let size_cells = bus.cells("#size-cells", 2);
        let Some(address) = read_cells(reg, cells) else {
            return;
        };
        let size = reg
            .get(4 * cells..)
            .and_then(|r| read_cells(r, size_cells))
            .unwrap_or(0);
        let address = translate(address, &ranges(bus));
        let interrupts: Vec<u32> = node
            .property("interrupts")
            .map(|v| {
                v.chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .filter(|&i| i != 0)
                    .collect()
            })
            .unwrap_or_default();
        let compatible = node.compatible();
        let irq_text = interrupts
            .iter()
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(",");
        let ours = match vmapple_place(&compatible, &node.name()) {
            Some((device, base, spi)) => {
                let irq_ok = spi.is_none_or(|s| interrupts.first() == Some(&(s + 32)));
                let verdict = if base == address && irq_ok {
                    "same"
                } else {
                    "DIFFERS"
                };
                match spi {
                    Some(s) => format!("{device} at {base:#x}, INTID {}: {verdict}", s + 32),
                    None => format!("{device} at {base:#x}: {verdict}"),
                }
            }
            None => "-".to_owned(),
        };
        let _ = writeln!(
            out,
            "{:<24} {:<28} {:>#12x} {:>#10x} {:>14}   {ours}",
            path,
            compatible.first().map(String::as_str).unwrap_or(""),
            address,
            size,
            irq_text
        );
    };
    fn walk(node: &Node, path: &str, bus: &Node, visit: &mut dyn FnMut(&Node, &str, &Node)) {
        visit(node, path, bus);
        for child in &node.children {
            let child_path = format!("{path}/{}", child.name());
            walk(child, &child_path, node, visit);
        }
    }
    for child in &root.children {
        walk(child, &child.name(), root, &mut visit);
    }
    out
}

#[cfg(test)]
pub mod tests {
    use super::*;

    pub fn u64s(values: &[u64]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    pub fn u32s(values: &[u32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// A VirtualMac2,1-like tree: arm-io mapping 0x1000_0000 and
    /// 0x2000_0000 up by 0x1000_0000, the avp,rtc below it, a PL031 where
    /// vmapple has one but on another interrupt.
    pub fn sample_tree() -> Vec<u8> {
        let rtc = Node::new(
            &[
                ("name", b"avp-rtc\0"),
                ("compatible", b"avp,rtc\0"),
                ("reg", &u64s(&[0x2024_0000, 0x4000])),
                ("interrupts", &u32s(&[51, 0])),
            ],
            vec![],
        );
        let pl031 = Node::new(
            &[
                ("name", b"pl031-rtc\0"),
                ("compatible", b"ARM,pl031\0"),
                ("reg", &u64s(&[0x1005_0000, 0x1000])),
                ("interrupts", &u32s(&[40])),
            ],
            vec![],
        );
        let arm_io = Node::new(
            &[
                ("name", b"arm-io\0"),
                ("compatible", b"arm-io,vmapple1\0"),
                (
                    "ranges",
                    &u64s(&[
                        0x1000_0000,
                        0x2000_0000,
                        0x1000_0000,
                        0x2000_0000,
                        0x3000_0000,
                        0x1000_0000,
                    ]),
                ),
            ],
            vec![rtc, pl031],
        );
        Node::new(&[("name", b"device-tree\0")], vec![arm_io]).to_bytes()
    }

    #[test]
    fn parses_apple_format_and_translates_through_ranges() {
        let tree = parse(&sample_tree()).unwrap();
        assert_eq!(tree.name(), "device-tree");
        let text = report(&tree);
        let rtc = text
            .lines()
            .find(|l| l.starts_with("arm-io/avp-rtc"))
            .unwrap();
        assert!(rtc.contains("0x30240000") && rtc.contains("51"), "{rtc}");
        assert!(
            rtc.ends_with("avp-rtc at 0x30240000, INTID 51: same"),
            "{rtc}"
        );
        let pl031 = text
            .lines()
            .find(|l| l.starts_with("arm-io/pl031-rtc"))
            .unwrap();
        assert!(pl031.contains("0x20050000"), "{pl031}");
        assert!(
            pl031.ends_with("DIFFERS"),
            "interrupt 40 is not SPI 2: {pl031}"
        );
    }

    #[test]
    fn img4_payloads_are_unwrapped() {
        let tree = sample_tree();
        let file = im4p("dtre", "test", &tree);
        assert_eq!(device_tree_bytes(&file).unwrap(), tree.as_slice());
        // Long-form DER lengths of one and two bytes both read back.
        let small = im4p("dtre", "x", &[0; 100]);
        assert_eq!(device_tree_bytes(&small).unwrap(), &[0; 100][..]);
        assert_eq!(device_tree_bytes(b"PK\x03\x04rest"), Err(AdtError::Zip));
    }

    #[test]
    fn hostile_files_are_errors() {
        let tree = sample_tree();
        for cut in [0, 4, 9, 40, tree.len() - 1] {
            assert!(parse(&tree[..cut]).is_err(), "cut at {cut}");
        }
        // A child count far beyond the data.
        let mut lying = Node::new(&[("name", b"x\0")], vec![]).to_bytes();
        lying[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(parse(&lying), Err(AdtError::Truncated("a node header")));
        // A property length beyond the data (the placeholder bit ignored).
        let mut long = Node::new(&[("name", b"x\0")], vec![]).to_bytes();
        long[40..44].copy_from_slice(&0xffff_fff0u32.to_le_bytes());
        assert!(parse(&long).is_err());
        // Nesting.
        let mut deep = Node::new(&[], vec![]);
        for _ in 0..=MAX_DEPTH {
            deep = Node::new(&[], vec![deep]);
        }
        assert_eq!(parse(&deep.to_bytes()), Err(AdtError::TooDeep));
        let mut trailing = tree.clone();
        trailing.push(1);
        assert_eq!(parse(&trailing), Err(AdtError::Trailing(1)));
    }

    #[test]
    fn a_parsed_tree_writes_back_to_the_same_bytes() {
        let bytes = sample_tree();
        assert_eq!(parse(&bytes).unwrap().to_bytes(), bytes);
    }

    #[test]
    fn ranges_pointing_past_the_address_space_do_not_panic() {
        let dev = Node::new(
            &[
                ("name", b"dev\0"),
                ("compatible", b"ARM,pl031\0"),
                ("reg", &u64s(&[0x10, 0x10])),
            ],
            vec![],
        );
        let bus = Node::new(
            &[
                ("name", b"arm-io\0"),
                ("ranges", &u64s(&[0, u64::MAX, u64::MAX])),
            ],
            vec![dev],
        );
        let tree = parse(&Node::new(&[("name", b"device-tree\0")], vec![bus]).to_bytes()).unwrap();
        let text = report(&tree);
        assert!(text.contains("arm-io/dev"), "{text}");
        assert!(text.contains("0xf "), "the address wraps: {text}");
    }
}
