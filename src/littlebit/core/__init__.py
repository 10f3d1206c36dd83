"""The method itself: bit budget, initialisation (Dual-SVID, Joint-ITQ), sign packing, the training
layer and the conversion of a model's linear layers. Depends on nothing else in littlebit but config."""
