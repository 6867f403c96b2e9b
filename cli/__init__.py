"""gvsl.cli"""
