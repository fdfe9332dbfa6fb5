"""The CPT-vs-upcycling study: built-in data (`data`), FLOP accounting (`flops`) and the report (`report`)."""
