// placeholder until regenerated
