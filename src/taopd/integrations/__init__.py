"""Drop-in TA-OPD for other trainers. `taopd.integrations.trl` needs `pip install 'taopd[trl]'`."""
