"""Model zoo: the Nucleic Transformer (OpenVaccine variant) and, later, the classification models."""
