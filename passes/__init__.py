"""FX graph passes: find attention, fold GQA expansion, rewrite decode attention to lychee ops."""
