//! Tracepoint record layouts, from tracefs's `format` files: where each field
//! sits differs between kernels (timer:timer_start gained `bucket_expiry`).

use std::collections::HashMap;

/// `field name → byte offset` of `category:event`'s record.
pub fn fields(category: &str, event: &str) -> Result<HashMap<String, u32>, String> {
    let path = format!(
        "{}/events/{category}/{event}/format",
        crate::mounts::TRACEFS
    );
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    Ok(parse(&text))
}

/// Lines like `\tfield:void * timer;\toffset:8;\tsize:8;\tsigned:0;`.
fn parse(format: &str) -> HashMap<String, u32> {
    format
        .lines()
        .filter_map(|l| {
            let decl = l.trim().strip_prefix("field:")?.split(';').next()?;
            let name = decl.rsplit([' ', '*']).next()?.split('[').next()?;
            let offset = l.split("offset:").nth(1)?.split(';').next()?.parse().ok()?;
            Some((name.to_owned(), offset))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_start_of_two_kernels() {
        let v6_18 = "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\n\tfield:void * timer;\toffset:8;\tsize:8;\tsigned:0;\n\tfield:void * function;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:unsigned long expires;\toffset:24;\tsize:8;\tsigned:0;\n\tfield:unsigned long bucket_expiry;\toffset:32;\tsize:8;\tsigned:0;\n\tfield:unsigned long now;\toffset:40;\tsize:8;\tsigned:0;\n";
        let f = parse(v6_18);
        assert_eq!(
            (f["timer"], f["function"], f["expires"], f["now"]),
            (8, 16, 24, 40)
        );
        let v6_1 = "\tfield:void * timer;\toffset:8;\tsize:8;\tsigned:0;\n\tfield:void * function;\toffset:16;\tsize:8;\tsigned:0;\n\tfield:unsigned long expires;\toffset:24;\tsize:8;\tsigned:0;\n\tfield:unsigned long now;\toffset:32;\tsize:8;\tsigned:0;\n\tfield:char comm[16];\toffset:40;\tsize:16;\tsigned:0;\n";
        let f = parse(v6_1);
        assert_eq!((f["now"], f["comm"]), (32, 40));
    }
}
