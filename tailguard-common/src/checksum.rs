//! The Internet checksum (RFC 1071) changed incrementally (RFC 1624), as
//! the programs rewrite headers: a change is a one's-complement sum of the
//! old words complemented and the new words, in the words' memory order
//! (the sum does not depend on byte order as long as every word is read the
//! same way). The kernel's checksum helpers take such a sum as their "diff"
//! (`bpf_l4_csum_replace` with no field size), the same form
//! `bpf_csum_diff` returns.

/// One's-complement addition of 32-bit partial sums (the carry wraps
/// around).
pub const fn add(sum: u32, add: u32) -> u32 {
    let (s, carry) = sum.overflowing_add(add);
    s + carry as u32
}

/// Folds a 32-bit partial sum to 16 bits.
pub const fn fold(sum: u32) -> u16 {
    let s = (sum & 0xffff) + (sum >> 16);
    ((s & 0xffff) + (s >> 16)) as u16
}

/// `sum` with one 16-bit word changed from `from` to `to`.
pub const fn replace16(sum: u32, from: u16, to: u16) -> u32 {
    add(add(sum, !from as u32), to as u32)
}

/// `sum` with the first `len` bytes (a multiple of 4, at most 16) of an
/// address changed from `from` to `to`, 32 bits at a time.
pub fn replace_addr(mut sum: u32, from: &[u8; 16], to: &[u8; 16], len: usize) -> u32 {
    let word = |a: &[u8; 16], i: usize| {
        u32::from_ne_bytes([a[4 * i], a[4 * i + 1], a[4 * i + 2], a[4 * i + 3]])
    };
    for i in 0..4 {
        if 4 * i < len {
            sum = add(add(sum, !word(from, i)), word(to, i));
        }
    }
    sum
}

/// A checksum field (as stored, memory order) after the data it covers
/// changed by `diff`.
pub const fn updated(field: u16, diff: u32) -> u16 {
    !fold(add(!field as u32, diff))
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use proptest::prelude::*;
    use std::vec::Vec;

    /// The checksum of `data` from scratch, 16-bit words in memory order.
    fn checksum(data: &[u8]) -> u16 {
        let mut sum = 0u32;
        for pair in data.chunks(2) {
            let word = u16::from_ne_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            sum = add(sum, u32::from(word));
        }
        !fold(sum)
    }

    fn addr(bytes: [u8; 16]) -> [u8; 16] {
        bytes
    }

    proptest! {
        /// Whatever the header and whatever changes, the updated field is
        /// the checksum computed anew.
        #[test]
        fn an_updated_checksum_is_the_one_computed_from_scratch(
            header in proptest::collection::vec(any::<u8>(), 40),
            new_src in any::<[u8; 16]>(),
            new_port in any::<u16>(),
            ipv6 in any::<bool>(),
        ) {
            let len = if ipv6 { 16 } else { 4 };
            let mut data: Vec<u8> = header.clone();
            let field = checksum(&data);
            let old_src = addr(data[..16].try_into().unwrap());
            let old_port = u16::from_ne_bytes([data[32], data[33]]);
            let mut diff = replace_addr(0, &old_src, &new_src, len);
            diff = replace16(diff, old_port, new_port);
            data[..len].copy_from_slice(&new_src[..len]);
            data[32..34].copy_from_slice(&new_port.to_ne_bytes());
            // Zero in either form (0 or 0xffff) is the same checksum.
            let got = updated(field, diff);
            let want = checksum(&data);
            prop_assert!(got == want || (got == 0 && want == 0xffff) || (got == 0xffff && want == 0),
                "got {got:#x}, want {want:#x}");
        }
    }

    #[test]
    fn the_checksum_of_rfc_1071s_example() {
        // RFC 1071 section 3's bytes: their sum folds to 0xddf2.
        let data = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        let mut sum = 0;
        for pair in data.chunks(2) {
            sum = add(sum, u32::from(u16::from_be_bytes([pair[0], pair[1]])));
        }
        assert_eq!(fold(sum), 0xddf2);
    }
}
