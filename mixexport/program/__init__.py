"""Analyses of a torch.export program (the graph a user gives ``build``)."""
