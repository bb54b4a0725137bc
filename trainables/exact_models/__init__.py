"""The paper's exact models as trials: kernel ridge regression (Sec. 3) and linear regression (Sec. 4)."""
