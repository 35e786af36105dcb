"""FX graph passes: find attention, fold GQA expansion, rewrite decode attention to lychee ops, group
a decode step's linears into decode_linear."""
