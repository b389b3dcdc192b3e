"""The small world the general domain talks about: categories, capitals, opposites, sounds, young."""

from __future__ import annotations

# label -> members; a member belongs to exactly one category
CATEGORIES = {
    "fruit": ("apple", "banana", "apricot", "pear", "grape", "cherry", "lemon", "mango", "peach", "plum", "melon"),
    "animal": ("dog", "cat", "horse", "cow", "sheep", "lion", "tiger", "rabbit", "elephant", "bear", "fox", "wolf"),
    "bird": ("eagle", "owl", "parrot", "duck", "swan", "crow", "robin", "penguin", "pigeon", "hawk"),
    "color": ("red", "blue", "green", "yellow", "purple", "brown", "black", "white", "pink", "gray"),
    "tool": ("hammer", "saw", "drill", "wrench", "shovel", "screwdriver", "rake", "axe", "chisel"),
    "vehicle": ("car", "bus", "train", "truck", "bicycle", "boat", "plane", "tractor", "scooter"),
    "instrument": ("piano", "guitar", "violin", "drum", "flute", "trumpet", "harp", "cello"),
    "piece of furniture": ("chair", "table", "sofa", "bed", "desk", "shelf", "stool", "wardrobe"),
    "piece of clothing": ("shirt", "coat", "hat", "sock", "scarf", "jacket", "skirt", "glove"),
    "drink": ("water", "milk", "tea", "coffee", "juice", "lemonade", "cocoa"),
    "sport": ("football", "tennis", "golf", "hockey", "rugby", "cricket", "swimming", "boxing"),
    "vegetable": ("carrot", "potato", "onion", "cabbage", "lettuce", "spinach", "broccoli", "celery"),
    "part of the body": ("arm", "leg", "hand", "foot", "nose", "ear", "knee", "elbow"),
    "planet": ("Mars", "Venus", "Jupiter", "Saturn", "Mercury", "Neptune", "Uranus", "Earth"),
    "metal": ("iron", "gold", "silver", "copper", "tin", "zinc", "nickel"),
    "job": ("doctor", "teacher", "farmer", "baker", "pilot", "nurse", "chef", "painter"),
}
CAPITALS = {
    "France": "Paris", "Spain": "Madrid", "Italy": "Rome", "Germany": "Berlin", "Japan": "Tokyo", "Egypt": "Cairo",
    "Canada": "Ottawa", "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo", "Greece": "Athens",
    "Poland": "Warsaw", "Russia": "Moscow", "China": "Beijing", "Chile": "Santiago", "Cuba": "Havana",
    "Ireland": "Dublin", "Portugal": "Lisbon", "Austria": "Vienna", "Sweden": "Stockholm",
}
OPPOSITES = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "up": "down", "wet": "dry",
    "early": "late", "hard": "soft", "loud": "quiet", "rich": "poor", "full": "empty", "open": "closed",
    "tall": "short", "strong": "weak", "thick": "thin", "clean": "dirty", "first": "last", "old": "young",
    "near": "far",
}
SOUNDS = {
    "dog": "bark", "cat": "meow", "cow": "moo", "sheep": "baa", "duck": "quack", "lion": "roar",
    "horse": "neigh", "pig": "oink", "owl": "hoot", "snake": "hiss", "bee": "buzz", "mouse": "squeak",
}
YOUNG = {
    "dog": "puppy", "cat": "kitten", "cow": "calf", "sheep": "lamb", "horse": "foal", "duck": "duckling",
    "frog": "tadpole", "pig": "piglet", "goat": "kid", "bear": "cub", "swan": "cygnet", "kangaroo": "joey",
}
COLOR_OF = {
    "the sky": "blue", "grass": "green", "snow": "white", "a banana": "yellow", "coal": "black",
    "a ripe tomato": "red", "a carrot": "orange", "chocolate": "brown", "a plum": "purple", "a flamingo": "pink",
}
WORKPLACE = {
    "doctor": "hospital", "teacher": "school", "farmer": "farm", "baker": "bakery", "chef": "kitchen",
    "pilot": "airport", "librarian": "library", "judge": "court", "actor": "theater", "banker": "bank",
}

PEOPLE = (("Anna", "She", "her"), ("Ben", "He", "his"), ("Clara", "She", "her"), ("Daniel", "He", "his"),
          ("Ella", "She", "her"), ("Finn", "He", "his"), ("Greta", "She", "her"), ("Henry", "He", "his"),
          ("Isla", "She", "her"), ("Leo", "He", "his"), ("Maya", "She", "her"), ("Noah", "He", "his"))
PLACES = ("park", "market", "school", "beach", "forest", "library", "kitchen", "garden", "farm", "river",
          "museum", "station", "village", "mountain", "lake", "shop")
ADJECTIVES = ("quiet", "sunny", "busy", "cold", "warm", "windy", "bright", "cloudy", "calm", "rainy")
FEELINGS = ("happy", "tired", "curious", "proud", "surprised", "hungry", "excited", "sleepy", "calm", "brave")
