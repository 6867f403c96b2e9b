"""gvsl.export"""
