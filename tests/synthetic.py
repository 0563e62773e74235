"""A small synthetic Chinese corpus that a model can learn from, for tests.

Each document tells a consecutive stretch of one fixed eight-step story with its own cast, so the
next sentence is predictable from the current one (sentence order objectives) and the names,
places and activities repeat inside a document (masked LM). Numbers in ASCII digits give words
that split into '##' pieces.
"""
import random

NAMES = ["小明", "小红", "张伟", "李娜", "王芳", "刘洋", "陈静", "杨帆", "赵磊", "黄敏"]
CITIES = ["北京", "上海", "广州", "深圳", "杭州", "成都", "西安", "南京", "武汉", "重庆"]
PLACES = ["公园", "图书馆", "博物馆", "海边", "山上", "市场", "学校", "河边"]
ACTIVITIES = ["散步", "看书", "画画", "跑步", "唱歌", "下棋", "拍照", "钓鱼"]
WEATHER = ["晴朗", "寒冷", "炎热", "凉爽", "潮湿"]
FOODS = ["面条", "饺子", "米饭", "包子", "火锅"]
FEELINGS = ["高兴", "满意", "轻松", "难忘", "开心"]

STORY = [
    "{a}住在{city}，已经{years}年了。",
    "{a}每天早上都去{place}{act}。",
    "有一天，{a}在{place}遇到了{b}。",
    "{b}问：“你也喜欢{act}吗？”",
    "{a}笑着说：“是的，我已经{act}了{years}年了！”",
    "那天的天气非常{weather}，他们一起吃了{food}。",
    "后来{a}和{b}成了好朋友……",
    "每个周末，他们都会一起去{place2}{act2}，大家都觉得很{feel}。",
]


def synthetic_documents(num_docs: int = 200, seed: int = 0) -> list[list[list[str]]]:
    """Documents as paragraphs as sentences; each document has 3 to 8 sentences in story order."""
    rng = random.Random(seed)
    documents = []
    for _ in range(num_docs):
        a, b = rng.sample(NAMES, 2)
        (place, place2), (act, act2) = rng.sample(PLACES, 2), rng.sample(ACTIVITIES, 2)
        slots = dict(a=a, b=b, city=rng.choice(CITIES), place=place, place2=place2, act=act, act2=act2,
                     years=rng.randint(2, 2000), weather=rng.choice(WEATHER), food=rng.choice(FOODS),
                     feel=rng.choice(FEELINGS))
        length = rng.randint(3, len(STORY))
        first = rng.randint(0, len(STORY) - length)
        paragraphs = [[]]
        for template in STORY[first : first + length]:
            if paragraphs[-1] and rng.random() < 0.3:
                paragraphs.append([])
            paragraphs[-1].append(template.format(**slots))
        documents.append(paragraphs)
    return documents


def write_synthetic_corpus(path, num_docs: int = 200, seed: int = 0) -> list[list[list[str]]]:
    """Write the corpus as .txt (a paragraph per line, a blank line between documents); returns its documents."""
    documents = synthetic_documents(num_docs, seed)
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n\n".join("\n".join("".join(p) for p in doc) for doc in documents) + "\n")
    return documents
