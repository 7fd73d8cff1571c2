//! Kernel symbol addresses from /proc/kallsyms (root sees them; zeros mean
//! `kernel.kptr_restrict` hides them).

use std::{
    collections::HashMap,
    fs::File,
    io::{BufRead, BufReader},
};

/// The addresses of `names`, read in one pass over /proc/kallsyms that
/// stops at the last one found (the kernel formats every line it is asked
/// for: the whole file takes it tens of ms).
pub fn lookup(names: &[&str]) -> Result<HashMap<String, u64>, String> {
    let file = File::open("/proc/kallsyms").map_err(|e| format!("/proc/kallsyms: {e}"))?;
    let mut lines = BufReader::with_capacity(1 << 16, file);
    let mut line = String::new();
    let mut found = HashMap::new();
    while found.len() < names.len() {
        line.clear();
        match lines.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => return Err(format!("/proc/kallsyms: {e}")),
        }
        let mut f = line.split_whitespace();
        let (Some(addr), Some(_kind), Some(sym)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        if names.contains(&sym)
            && !found.contains_key(sym)
            && let Ok(a) = u64::from_str_radix(addr, 16)
        {
            found.insert(sym.to_owned(), a);
        }
    }
    Ok(found)
}

/// One text or data symbol's address, refusing a hidden (zero) one.
pub fn address(name: &str) -> Result<u64, String> {
    match lookup(&[name])?.get(name) {
        None => Err(format!("no {name} in /proc/kallsyms")),
        Some(0) => Err(format!(
            "{name} is hidden in /proc/kallsyms (kernel.kptr_restrict)"
        )),
        Some(&a) => Ok(a),
    }
}
