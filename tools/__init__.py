"""Tools that use both sides: accuracy diff (compare, report, layerwise), export checks and the
fp32/quantized twins, the export pipeline, and every benchmark. They may import the exporter and
the runtime; neither imports them."""
