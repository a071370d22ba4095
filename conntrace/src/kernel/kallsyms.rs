//! Names kernel code addresses (a drop's `location`) from /proc/kallsyms.

use std::path::Path;

/// Text symbols of the running kernel, sorted by address.
#[derive(Debug, Default)]
pub struct Kallsyms {
    symbols: Vec<(u64, String)>,
}

impl Kallsyms {
    /// Reads /proc/kallsyms. With `kptr_restrict` hiding addresses (all zero), the table is
    /// empty and locations are shown as raw addresses.
    pub fn load(path: &Path) -> std::io::Result<Self> {
        Ok(Self::parse(&std::fs::read_to_string(path)?))
    }

    /// Parses `ADDRESS TYPE NAME [MODULE]` lines, keeping text (code) symbols.
    pub fn parse(text: &str) -> Self {
        let mut symbols: Vec<(u64, String)> = text
            .lines()
            .filter_map(|line| {
                let mut parts = line.split_whitespace();
                let addr = u64::from_str_radix(parts.next()?, 16).ok()?;
                let kind = parts.next()?;
                let name = parts.next()?;
                (addr != 0 && matches!(kind, "t" | "T")).then(|| (addr, name.to_owned()))
            })
            .collect();
        symbols.sort_unstable_by_key(|(addr, _)| *addr);
        Self { symbols }
    }

    /// The symbol covering `addr` and the offset into it.
    fn lookup(&self, addr: u64) -> Option<(&str, u64)> {
        if addr == 0 {
            return None;
        }
        let idx = self.symbols.partition_point(|(a, _)| *a <= addr);
        let (start, name) = self.symbols.get(idx.checked_sub(1)?)?;
        Some((name, addr - start))
    }

    /// The function containing `addr` (`nf_hook_slow`), if a symbol covers it.
    pub fn function(&self, addr: u64) -> Option<&str> {
        self.lookup(addr).map(|(name, _)| name)
    }

    /// `nf_hook_slow+0x44`, or the address in hex when no symbol covers it.
    pub fn name(&self, addr: u64) -> String {
        match self.lookup(addr) {
            Some((name, offset)) => format!("{name}+{offset:#x}"),
            None => format!("{addr:#x}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_addresses_inside_text_symbols() {
        let k = Kallsyms::parse(
            "ffffffff81000000 T _stext\n\
             ffffffff81a00000 t nf_hook_slow\n\
             ffffffff81a00100 D some_data\n\
             ffffffff81a00200 T tcp_v4_rcv\n\
             ffffffffc0001000 t xt_action [x_tables]\n",
        );
        assert_eq!(k.name(0xffff_ffff_81a0_0044), "nf_hook_slow+0x44");
        // Data symbols do not end a function.
        assert_eq!(k.name(0xffff_ffff_81a0_0150), "nf_hook_slow+0x150");
        assert_eq!(k.name(0xffff_ffff_81a0_0200), "tcp_v4_rcv+0x0");
        assert_eq!(k.name(0xffff_ffff_c000_1010), "xt_action+0x10");
        assert_eq!(k.name(0x1000), "0x1000");
        assert_eq!(k.function(0xffff_ffff_81a0_0044), Some("nf_hook_slow"));
        assert_eq!(k.function(0), None);
    }

    #[test]
    fn restricted_kallsyms_give_raw_addresses() {
        let k = Kallsyms::parse("0000000000000000 T _stext\n0000000000000000 t nf_hook_slow\n");
        assert_eq!(k.name(0xffff_ffff_81a0_0044), "0xffffffff81a00044");
    }
}
