//! `kiln`, the command-line interface: the product's primary surface.

fn main() {}
