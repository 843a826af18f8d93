"""The model zoo: `registry` builds a model by name and preset; one module per family (hafnet, sfer_mdfae,
resnet_cbam, r2plus1d, mafnet), with `backbones/`, Opacus samplers for custom layers (`dp_layers`),
parameter and MAC counts (`complexity`) and partial checkpoint loading (`pretrained`)."""
