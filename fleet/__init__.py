"""The Tillsyn fleet service: plans windows, signs commands, tracks devices, raises visits."""
