//! `vmapple inspect-ipsw`'s reader of Apple's device tree
//! (`machine::adt`): the file comes from an IPSW the user downloaded, so
//! every count, length and `ranges` entry in it is untrusted.
//!
//! Input: the file as `inspect-ipsw` reads it (an IM4P or a raw tree).

use machine::adt::{device_tree_bytes, parse, report, Node};

use crate::Report;

fn count(node: &Node) -> u64 {
    1 + node.children.iter().map(count).sum::<u64>()
}

/// Runs one input; `completions` counts the nodes of a tree that parsed.
pub fn apple_dt(data: &[u8]) -> Report {
    let mut r = Report {
        ops: 1,
        ..Report::default()
    };
    if let Ok(tree) = device_tree_bytes(data).and_then(parse) {
        r.completions = count(&tree);
        // Every node (the root aside) gets at most one line of report.
        let lines = report(&tree).lines().count() as u64;
        assert!(
            lines <= r.completions,
            "{lines} lines for {} nodes",
            r.completions
        );
        // Names that were not UTF-8 come back altered, but the shape holds.
        let again = parse(&tree.to_bytes()).expect("a parsed tree writes back parseable");
        assert_eq!(count(&again), r.completions);
    }
    r
}
